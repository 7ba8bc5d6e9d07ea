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
