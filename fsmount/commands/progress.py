"""The progress bar of `fsmount cache prefetch`, plain and `--batch`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fsmount.status.render import format_size

if TYPE_CHECKING:
    from rich.progress import Progress


def progress_bar() -> Progress:
    """Bytes, rate and time left on stderr; nothing when stderr is not a terminal (the
    summary line says what was done). Imported here: rich takes a while to load."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        """Binary units, like the sizes beside it (rich's own rate column is decimal)."""

        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(
                "?" if speed is None else f"{format_size(speed)}/s", style="progress.data.speed"
            )

    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        Rate(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
