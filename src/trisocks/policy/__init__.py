"""Account policy: destination rules, connection and speed limits, and their API form."""
