"""The Lua scripts of the Redis store (redis_store.py has the key layout).

One script per operation: Redis runs a script alone, so a check and the write that depends
on it (a unique key, an owner that still exists) cannot be split by another node. Every
script gets the key prefix as ARGV[1], then its arguments as text.

A script that fails half-way keeps what it wrote, and a flush that failed is sent again:
so the flush checks what could fail (a key of the wrong type, a count that is not a
number) before it writes anything.
"""

from __future__ import annotations

_COMMON = """
local P = ARGV[1]
local function bump() redis.call('INCR', P .. ':generation') end
local function seq() return redis.call('INCR', P .. ':seq') end
local function kind(key) return redis.call('TYPE', key)['ok'] end
local function members(key)
  if kind(key) ~= 'zset' then return {} end
  return redis.call('ZRANGE', key, 0, -1)
end
"""

_SCHEMA = """
local stored = redis.call('GET', P .. ':schema')
if not stored then
  redis.call('SET', P .. ':schema', ARGV[2])
  return ARGV[2]
end
return stored
"""

_PUT_TOKEN = """
redis.call('HSET', P .. ':token:' .. ARGV[2], 'rec', ARGV[3])
redis.call('ZADD', P .. ':tokens', 'NX', seq(), ARGV[2])
bump()
"""

_DELETE_TOKENS = """
for i = 2, #ARGV do
  redis.call('DEL', P .. ':token:' .. ARGV[i])
  redis.call('ZREM', P .. ':tokens', ARGV[i])
end
bump()
"""

# A key or name that another user has is refused; the user's old ones leave the indexes.
_PUT_USER = """
local id, key, name = ARGV[2], ARGV[3], ARGV[4]
local keys, names = P .. ':user-keys', P .. ':user-names'
local other = redis.call('HGET', keys, key)
if other and other ~= id then return 'key' end
other = redis.call('HGET', names, name)
if other and other ~= id then return 'name' end
local user = P .. ':user:' .. id
local old = redis.call('HMGET', user, 'key', 'name')
if old[1] and old[1] ~= key and redis.call('HGET', keys, old[1]) == id then
  redis.call('HDEL', keys, old[1])
end
if old[2] and old[2] ~= name and redis.call('HGET', names, old[2]) == id then
  redis.call('HDEL', names, old[2])
end
redis.call('HSET', user, 'rec', ARGV[5], 'key', key, 'name', name)
redis.call('HSET', keys, key, id)
redis.call('HSET', names, name, id)
redis.call('ZADD', P .. ':users', 'NX', seq(), id)
bump()
return 'ok'
"""

_RESET_USER = """
local user = P .. ':user:' .. ARGV[2]
if kind(user) == 'hash' then redis.call('HSET', user, 'bytes_up', 0, 'bytes_down', 0) end
bump()
"""

# The user's usage history goes with it.
_DELETE_USER = """
local id = ARGV[2]
local user = P .. ':user:' .. id
if kind(user) == 'hash' then
  local old = redis.call('HMGET', user, 'key', 'name')
  for i, index in ipairs({P .. ':user-keys', P .. ':user-names'}) do
    if old[i] and redis.call('HGET', index, old[i]) == id then redis.call('HDEL', index, old[i]) end
  end
end
redis.call('DEL', user)
redis.call('ZREM', P .. ':users', id)
for _, hour in ipairs(members(P .. ':usage-hours')) do
  redis.call('HDEL', P .. ':usage:' .. hour, 'user:u:' .. id, 'user:d:' .. id, 'user:c:' .. id)
end
bump()
"""

# A replaced webhook moves to the end, as SQLite's INSERT OR REPLACE gives it a new row.
_PUT_WEBHOOK = """
redis.call('HSET', P .. ':webhook', ARGV[2], ARGV[3])
redis.call('ZADD', P .. ':webhooks', seq(), ARGV[2])
bump()
"""

_DELETE_WEBHOOK = """
redis.call('HDEL', P .. ':webhook', ARGV[2])
redis.call('ZREM', P .. ':webhooks', ARGV[2])
bump()
"""

# ARGV: P, hour ('' for none), events kept, n counters, m events,
# n x (owner, ident, up, down, connections, last_seen or ''), the server's up, down and
# connections for the hour, m x JSON of an event without its id.
_FLUSH = """
local hour, kept, n, m = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local usage = P .. ':usage:' .. hour
local function need(key, types)
  local found = kind(key)
  for _, t in ipairs(types) do if found == t then return end end
  error('flush: ' .. key .. ' is a ' .. found .. ', not a ' .. types[1])
end
-- every check first, before anything is written
need(P .. ':events', {'stream', 'none'})
need(P .. ':event-id', {'string', 'none'})
if hour ~= '' then
  need(usage, {'hash', 'none'})
  need(P .. ':usage-hours', {'zset', 'none'})
end
local function add(key, f, by)
  if by == '0' then return end
  local v = redis.call('HGET', key, f)
  -- a count that is not one is read as 0: so it is written, and HINCRBY cannot fail
  if v and not (string.match(v, '^%-?%d+$') and #v < 19) then redis.call('HSET', key, f, 0) end
  redis.call('HINCRBY', key, f, by)
end
local used = false
local at = 6
for _ = 1, n do
  local owner, ident, up, down, conns, seen = unpack(ARGV, at, at + 5)
  at = at + 6
  local key = P .. ':' .. owner .. ':' .. ident
  if kind(key) == 'hash' then  -- an owner deleted meanwhile is not brought back
    add(key, 'bytes_up', up)
    add(key, 'bytes_down', down)
    add(key, 'total_connections', conns)
    if seen ~= '' then
      local before = tonumber(redis.call('HGET', key, 'last_seen'))
      if not before or tonumber(seen) > before then redis.call('HSET', key, 'last_seen', seen) end
    end
    if hour ~= '' and (up ~= '0' or down ~= '0' or conns ~= '0') then
      add(usage, owner .. ':u:' .. ident, up)
      add(usage, owner .. ':d:' .. ident, down)
      add(usage, owner .. ':c:' .. ident, conns)
      used = true
    end
  end
end
if hour ~= '' then
  local up, down, conns = unpack(ARGV, at, at + 2)
  if up ~= '0' or down ~= '0' or conns ~= '0' then
    add(usage, 'server:u:', up)
    add(usage, 'server:d:', down)
    add(usage, 'server:c:', conns)
    used = true
  end
  if used then redis.call('ZADD', P .. ':usage-hours', hour, hour) end
end
at = at + 3
if m > 0 then
  local last = redis.call('INCRBY', P .. ':event-id', m)
  for j = 0, m - 1 do
    redis.call('XADD', P .. ':events', 'MAXLEN', '~', kept, '*',
               'id', last - m + 1 + j, 'e', ARGV[at + j])
  end
end
"""

_SNAPSHOT = """
local out = {}
for i, what in ipairs({'token', 'user'}) do
  local list = {}
  for _, id in ipairs(members(P .. ':' .. what .. 's')) do
    local key = P .. ':' .. what .. ':' .. id
    if kind(key) == 'hash' then
      list[#list + 1] = id
      list[#list + 1] = redis.call('HGETALL', key)
    end
  end
  out[i] = list
end
local hooks = {}
if kind(P .. ':webhook') == 'hash' then
  for _, name in ipairs(members(P .. ':webhooks')) do
    local body = redis.call('HGET', P .. ':webhook', name)
    if body then hooks[#hooks + 1] = body end
  end
end
out[3] = hooks
return out
"""

_EVENTS = """
if kind(P .. ':events') ~= 'stream' then return {} end
return redis.call('XREVRANGE', P .. ':events', '+', '-', 'COUNT', ARGV[2])
"""

# ARGV: P, owner, ident, first hour, last hour -> {hour, up, down, connections}...
_USAGE = """
local f = {ARGV[2] .. ':u:' .. ARGV[3], ARGV[2] .. ':d:' .. ARGV[3], ARGV[2] .. ':c:' .. ARGV[3]}
local out = {}
if kind(P .. ':usage-hours') ~= 'zset' then return out end
for _, hour in ipairs(redis.call('ZRANGEBYSCORE', P .. ':usage-hours', ARGV[4], ARGV[5])) do
  local key = P .. ':usage:' .. hour
  if kind(key) == 'hash' then
    local v = redis.call('HMGET', key, f[1], f[2], f[3])
    if v[1] or v[2] or v[3] then out[#out + 1] = {hour, v[1] or '0', v[2] or '0', v[3] or '0'} end
  end
end
return out
"""

_PRUNE_USAGE = """
local hours = P .. ':usage-hours'
local old = redis.call('ZRANGEBYSCORE', hours, '-inf', '(' .. ARGV[2])
for _, hour in ipairs(old) do redis.call('UNLINK', P .. ':usage:' .. hour) end
redis.call('ZREMRANGEBYSCORE', hours, '-inf', '(' .. ARGV[2])
"""

# Heartbeats expire by themselves; the list forgets them at the next put of any node.
_PUT_NODE = """
redis.call('SET', P .. ':node:' .. ARGV[2], ARGV[3], 'PX', ARGV[4])
redis.call('ZADD', P .. ':nodes', 0, ARGV[2])
for _, id in ipairs(members(P .. ':nodes')) do
  if redis.call('EXISTS', P .. ':node:' .. id) == 0 then redis.call('ZREM', P .. ':nodes', id) end
end
"""

# Members all score 0: ZRANGE gives them by id.
_NODES = """
local out = {}
for _, id in ipairs(members(P .. ':nodes')) do
  local key = P .. ':node:' .. id
  if kind(key) == 'string' then out[#out + 1] = redis.call('GET', key) end
end
return out
"""

_DELETE_NODE = """
redis.call('DEL', P .. ':node:' .. ARGV[2])
redis.call('ZREM', P .. ':nodes', ARGV[2])
"""

SCRIPTS = {name: _COMMON + code for name, code in {
    "schema": _SCHEMA, "put_token": _PUT_TOKEN, "delete_tokens": _DELETE_TOKENS,
    "put_user": _PUT_USER, "reset_user": _RESET_USER, "delete_user": _DELETE_USER,
    "put_webhook": _PUT_WEBHOOK, "delete_webhook": _DELETE_WEBHOOK, "flush": _FLUSH,
    "snapshot": _SNAPSHOT, "events": _EVENTS, "usage": _USAGE, "prune_usage": _PRUNE_USAGE,
    "put_node": _PUT_NODE, "nodes": _NODES, "delete_node": _DELETE_NODE,
}.items()}
