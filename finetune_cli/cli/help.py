"""Help that reads like a man page, at 80 columns as at 200.

- The usage line names the arguments (`TARGET IMAGES...`); value
  placeholders (`PATH`, `INT`, `csv|json`) appear only for options that
  take a value, none for flags and arguments.
- Option names are never cut: they sit in a column that does not wrap, with
  the help beside them, or on the next line when the names are long
  (Typer's own panel shares the width out and cuts names with "...").
"""

from __future__ import annotations

import functools

import typer
import typer.core


class _Help:
    def get_params(self, ctx):
        # Every use of the parameters (help, usage, parsing, errors) goes
        # through here, including --help and the completion options.
        params = super().get_params(ctx)
        for param in params:
            _plain_help(param)
        return params

    def format_help(self, ctx, formatter):
        _use_our_options_panel()
        return super().format_help(ctx, formatter)


def _plain_help(param) -> None:
    if isinstance(param, typer.core.TyperArgument):
        param.metavar = param.metavar or param.name.upper()
        param.display_type_rich = lambda ctx=None: None
    elif param.is_flag:
        param.display_type_rich = lambda ctx=None: None
    else:
        param.display_type_rich = functools.partial(_placeholder, param)


class Group(_Help, typer.core.TyperGroup):
    pass


class Command(_Help, typer.core.TyperCommand):
    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = param.metavar + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


def _placeholder(param, ctx=None) -> str:
    # Typer writes `<path>`, `<int range>`, `<list[str]>`; a metavar wins.
    label = typer.core.TyperOption.display_type_rich(param, ctx)
    label = label.strip("<>").replace(" range", "")
    if label.startswith("list[") or param.multiple:
        label = label.removeprefix("list[").rstrip("]")
    return label if "|" in label or param.metavar else label.upper()


def _use_our_options_panel() -> None:
    from typer import rich_utils

    # Typer draws the panel in a private function; where it is not there
    # (another Typer), its own panel is used as it is.
    if hasattr(rich_utils, "_print_options_panel"):
        rich_utils._print_options_panel = _print_options_panel


def _names(param) -> str:
    if isinstance(param, typer.core.TyperArgument):
        name = param.display_name_raw if hasattr(param, "display_name_raw") else None
        return name or param.metavar or param.name.upper()
    longs = [o for o in param.opts if o.startswith("--")]
    shorts = [o for o in param.opts if not o.startswith("--")]
    text = "/".join([*longs, *(o for o in param.secondary_opts if "--" in o)])
    if shorts:
        text += ", " + ", ".join(shorts)
    kind = param.display_type_rich(ctx=None)
    if kind:
        text += f" {kind}"
    rng = param._get_number_range_help_str()
    if rng:
        text += f" [{rng}]"
    return text


def _print_options_panel(*, name, params, ctx, markup_mode, console) -> None:
    """Typer's options panel with whole option names (see the module doc)."""
    from rich.console import Group as Stack
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text
    from typer import rich_utils

    if not params:
        return
    inner = console.width - 4  # the panel's borders and padding
    rows = [
        (
            _names(p),
            rich_utils._get_parameter_help(param=p, ctx=ctx, markup_mode=markup_mode),
        )
        for p in params
    ]
    # The names column: as wide as the longest names that fit in a third
    # of the width; longer names take a line of their own.
    width = max((len(n) for n, _ in rows if len(n) <= inner // 3), default=8)
    parts = []
    for names, help_text in rows:
        grid = Table.grid(padding=(0, 2), expand=True)
        grid.add_column(width=width, no_wrap=True, style=rich_utils.STYLE_OPTION)
        grid.add_column(ratio=1)
        if len(names) <= width:
            grid.add_row(Text(names), help_text)
        else:
            parts.append(Text(names, style=rich_utils.STYLE_OPTION))
            grid.add_row("", help_text)
        parts.append(grid)
    console.print(
        Panel(
            Stack(*parts),
            border_style=rich_utils.STYLE_OPTIONS_PANEL_BORDER,
            title=name,
            title_align=rich_utils.ALIGN_OPTIONS_PANEL,
        )
    )
