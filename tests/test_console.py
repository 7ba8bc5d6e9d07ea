"""Console output: plain lines for logs, rich bars at a terminal, and a
message never glued onto a bar."""

import io

from rich.console import Console

from finetune_cli.console import Output


def test_plain_table_rows_stay_one_line():
    f = io.StringIO()
    out = Output(file=f, plain=True)
    path = "/data/" + "x" * 200 + ".jpg"
    out.table("runs", ["run", "started", "path"], [["r1", "2026-11-24T05:25:23", path]])
    row = next(line for line in f.getvalue().splitlines() if "r1" in line)
    assert path in row and "2026-11-24T05:25:23" in row
    assert "+--" in f.getvalue()  # still a table


def test_plain_counter_logs_a_final_line_and_no_bar():
    f = io.StringIO()
    out = Output(file=f, plain=True)
    with out.counter(4, "pre-flight") as progress:
        for i in range(1, 5):
            progress(i)
    assert f.getvalue().splitlines() == [
        next(x for x in f.getvalue().splitlines() if x.startswith("pre-flight: 4/4"))
    ]
    f = io.StringIO()
    with Output(file=f, plain=True).counter(4, "predict", final=False) as progress:
        progress(4)
    assert f.getvalue() == ""


def test_an_error_ends_a_live_progress_bar_first():
    screen, err = io.StringIO(), io.StringIO()
    out = Output(file=screen, plain=False, err_file=err)
    out.console = Console(file=screen, force_terminal=True, width=80)
    bar = out.progress(10, "epoch 3 (head)")
    bar.__enter__()  # as Keras' on_epoch_begin does; Ctrl-C skips the end
    bar.update(4, "loss 0.5")
    live = bar._progress.live
    assert live.is_started
    out.error("interrupted", "stopped by Ctrl-C or SIGTERM")
    assert not live.is_started
    assert err.getvalue() == "interrupted: stopped by Ctrl-C or SIGTERM\n"
    # The bar was transient: cleared, with the cursor at a line start.
    assert not screen.getvalue().endswith("loss 0.5")


def _terminal(width=80, **kwargs):
    f = io.StringIO()
    out = Output(file=f, plain=False, **kwargs)
    out.console = Console(
        file=f, width=width, force_terminal=True, no_color=True, highlight=False
    )
    return out, f


def test_a_table_wider_than_the_terminal_becomes_a_list_that_splits_no_word():
    out, f = _terminal()
    cols = ["#", "phase", "trains", "BN mode", "optimizer", "LR", "path"]
    row = ["1", "fine-tune", "top 54 base layers", "inference (frozen)"]
    row += ["adam", "1e-4", "cached activations, 2 augmented views"]
    out.table("plan", cols, [row])
    lines = f.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert not any("│" in line for line in lines)  # a list, not a table
    words = " ".join(lines).split()
    for cell in row[2:]:
        for word in cell.split():
            assert word in words, (word, lines)  # never cut inside a word
    # A table that fits stays a table.
    out, f = _terminal()
    out.table("small", ["a", "b"], [["1", "2"]])
    assert "│" in f.getvalue()


def test_internal_names_reach_a_terminal_only_with_verbose_and_always_the_log(
    tmp_path,
):
    full = "activations at block_16_depthwise:0: reusing features/t/f8c3c20a"
    brief = "activations: reusing the cache"
    out, f = _terminal()
    out.attach_log(tmp_path / "log.txt")
    out.info(full, brief=brief)
    out.step(f"phase 2 ({full})", brief=f"phase 2 ({brief})")
    out.close()
    assert "block_16" not in f.getvalue() and brief in f.getvalue()
    assert (tmp_path / "log.txt").read_text().count("block_16_depthwise") == 2
    out, f = _terminal(verbose=True)
    out.info(full, brief=brief)
    assert "block_16_depthwise" in f.getvalue()
    f = io.StringIO()
    Output(file=f, plain=True).info(full, brief=brief)
    assert "block_16_depthwise" in f.getvalue()


def test_small_numbers_are_short():
    from finetune_cli.console import sci

    assert [sci(v) for v in (1e-3, 0.0001, 2.5e-4, 0.0, 0.01)] == [
        "1e-3",
        "1e-4",
        "2.5e-4",
        "0",
        "1e-2",
    ]


def test_paths_with_colons_are_shown_as_written():
    """rich turns `:ram:` into an emoji unless told not to: a path
    `records:ram://bucket` must stay a path, in a terminal and in a log."""
    for plain in (True, False):
        buf = io.StringIO()
        Output(file=buf, plain=plain).info("records:ram://bucket/x :smile:")
        assert "records:ram://bucket/x :smile:" in buf.getvalue()
