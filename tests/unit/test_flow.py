"""trisocks.net.flow: how far a session's channel windows may grow."""

from __future__ import annotations

from trisocks.net.flow import INITIAL_WINDOW, MAX_WINDOW, WindowBudget, initial_window


def test_initial_window_is_the_smaller_of_the_maximum_and_the_start():
    assert initial_window(MAX_WINDOW) == INITIAL_WINDOW
    assert initial_window(1000) == 1000


def test_a_window_doubles_while_there_is_room():
    budget = WindowBudget(maximum=1 << 20, budget=1 << 30)
    window = 64 << 10
    assert budget.grow(window) == window
    assert budget.grown == window


def test_growth_stops_at_the_per_channel_maximum():
    budget = WindowBudget(maximum=100, budget=1 << 30)
    assert budget.grow(80) == 20
    assert budget.grow(100) == 0
    assert budget.grown == 20


def test_growth_stops_at_the_session_budget():
    budget = WindowBudget(maximum=1 << 20, budget=150)
    assert budget.grow(100) == 100
    assert budget.grow(100) == 50
    assert budget.grow(100) == 0
    assert budget.grown == 150


def test_release_gives_growth_back_to_other_channels():
    budget = WindowBudget(maximum=1 << 20, budget=100)
    extra = budget.grow(100)
    assert budget.grow(100) == 0
    budget.release(extra)
    assert budget.grown == 0
    assert budget.grow(100) == 100


def test_windows_grown_together_never_pass_the_budget():
    budget = WindowBudget(maximum=MAX_WINDOW, budget=10 * INITIAL_WINDOW)
    windows = [INITIAL_WINDOW] * 8
    for _ in range(10):
        for i, w in enumerate(windows):
            windows[i] = w + budget.grow(w)
    assert budget.grown == 10 * INITIAL_WINDOW
    assert sum(windows) - 8 * INITIAL_WINDOW == budget.grown
    assert max(windows) <= MAX_WINDOW
