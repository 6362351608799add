"""How streamed text with carriage returns is cut before it is shown (no pool needed)."""

from __future__ import annotations

from nbdist.kernel._output import final_state, latest


def test_a_redrawn_bar_is_cut_to_its_last_state_and_still_draws_over_its_line() -> None:
    assert latest("  0%|   |\r 50%|#  |\r100%|###|") == "\r100%|###|"
    assert latest("epoch 1\r\n") == "\repoch 1\r\n"  # a trailing return is kept for the next piece
    assert latest("plain text\nno returns\n") == "plain text\nno returns\n"
    assert latest("a\rb\nc\rd\n") == "\rb\n\rd\n"


def test_a_complete_line_shows_what_the_last_return_left() -> None:
    assert final_state("step 1/5\rstep 2/5\rstep 5/5") == "step 5/5"
    assert final_state("step 5/5\r") == "step 5/5"
    assert final_state("no return") == "no return"
