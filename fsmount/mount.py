"""The mount's lifecycle: build the layers, check the services, mount, serve, unmount.

Signals are received by trio before anything is mounted, so SIGINT/SIGTERM always lead to a
clean unmount and exit code 0. A crash leaves the mount as it is (ENOTCONN rather than an empty
directory a mirror job could mistake for deleted data); `fsmount unmount` or systemd's
`ExecStopPost` clears it.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import pyfuse3
import trio

from fsmount.cache.blocks import BlockStore
from fsmount.cache.layout import CacheLayout
from fsmount.cache.metadata import MetadataStore
from fsmount.config import Config
from fsmount.content import Content
from fsmount.errors import StartupError
from fsmount.fs import Operations
from fsmount.mountinfo import read_mounts
from fsmount.sources import grand_challenge, scenario
from fsmount.sources.base import SourceFactory
from fsmount.sources.scenario import Scenario
from fsmount.status.control import Command, serve_control
from fsmount.status.document import Collect
from fsmount.status.paths import control_path, socket_path
from fsmount.status.server import open_metrics_listeners, serve_metrics_on, serve_status
from fsmount.transfer import (
    ApiClient,
    Credentials,
    HttpPolicy,
    Storage,
    TransferStats,
    raise_read_size,
    redact,
)
from fsmount.tree import Directory, TreeContext

log = logging.getLogger(__name__)

KERNEL_READAHEAD_KIB = 4096
SOURCES: tuple[SourceFactory, ...] = (grand_challenge.from_config, scenario.from_config)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)


def task_stacks() -> str:
    """Every trio task and where it waits: the first thing to look at on a hung mount."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        indent = "  " * depth
        lines.append(f"{indent}task {task.name}")
        for frame, lineno in task.iter_await_frames():
            code = frame.f_code
            lines.append(f"{indent}  {code.co_filename}:{lineno} in {code.co_name}")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    root = trio.lowlevel.current_root_task()
    if root is not None:
        walk(root, 0)
    return "\n".join(lines)


async def raise_kernel_readahead(
    mountpoint: Path, initialized: trio.Event, kib: int = KERNEL_READAHEAD_KIB
) -> None:
    """Let the kernel read ahead in 1 MiB requests instead of 128 KiB ones (root only).

    Fewer, larger FUSE reads are most of the speed of a sequential read through Python. The
    mount's device comes from mountinfo, not from a stat of the mount point (a request to this
    very process). The kernel lowers the value when it processes FUSE's INIT reply, so it is
    written once `initialized` is set (the reply is then written); a file opened before it
    holds keeps 128 KiB requests, hence the tight re-checks, for at most a second.
    """
    await initialized.wait()
    devices = [m.device for m in read_mounts() if m.mount_point == str(mountpoint)]
    if not devices:
        return
    setting = Path(f"/sys/class/bdi/{devices[-1]}/read_ahead_kb")
    for _ in range(100):
        try:
            setting.write_text(str(kib))
            await trio.sleep(0.01)
            if setting.read_text().strip() == str(kib):
                log.debug("kernel readahead for %s: %d KiB", mountpoint, kib)
                return
        except OSError as exc:
            log.debug("kernel readahead left as it is: %s", exc)
            return


class _GoneRequests(logging.Filter):
    """pyfuse3 logs an ERROR when the kernel refuses a reply with ENOENT. That only means the
    request is gone: it was interrupted, or the mount went away while the kernel's own
    readahead was still being answered. libfuse says nothing then; this makes it debug."""

    GONE = f"fuse_reply_* failed with {os.strerror(errno.ENOENT)}"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.getMessage().endswith(self.GONE):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def fuse_options(cfg: Config) -> set[str]:
    options = set(pyfuse3.default_options)  # default_permissions
    options |= {"fsname=fsmount", "subtype=fsmount", "ro", "nosuid", "nodev", "noatime"}
    if cfg.allow_other:
        options.add("allow_other")
    return options


async def serve(
    cfg: Config, mountpoint: Path, ready: Callable[[], None], *, hangup_unmounts: bool = False
) -> None:
    """Mount at `mountpoint` and serve until unmounted or told to stop by a signal.

    SIGHUP drops the cached listings (`systemctl reload`), unless `hangup_unmounts`: for an
    interactive mount, it means its terminal closed, and it unmounts as on Ctrl-C.
    """
    raise_read_size()
    logging.getLogger("pyfuse3").addFilter(_GoneRequests())
    with trio.open_signal_receiver(
        signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1
    ) as signals:
        async with AsyncExitStack() as stack:
            cache = CacheLayout(cfg.cache_path)
            cache.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            metadata = MetadataStore(cache.metadata)
            stack.callback(metadata.close)
            policy = HttpPolicy.within(cfg.timeout)
            stats = TransferStats()
            storage = Storage(policy, stats)
            stack.push_async_callback(storage.aclose)
            # Readahead stays below the block store's in-memory budget (32 MiB), so blocks
            # fetched ahead are served from memory rather than read back from disk.
            blocks = BlockStore(cache.blocks, budget=cfg.cache_size, readahead=24 << 20)
            # Closed before storage: it finishes the downloads left running behind readers.
            stack.push_async_callback(blocks.aclose)
            ctx = TreeContext(metadata.first_seen_many, listing_ttl=cfg.dir_cache_time)

            apis: list[ApiClient] = []

            def connect(url: str, headers: Callable[[], dict[str, str]], name: str) -> ApiClient:
                api = ApiClient(url, Credentials(headers), policy, stats, name=name)
                stack.push_async_callback(api.aclose)
                apis.append(api)
                return api

            services: list[Directory] = []
            exports: Scenario | None = None  # what `fsmount cache prefetch --batch` asks
            for from_config in SOURCES:
                source = from_config(cfg, connect, ctx)
                if source is None:
                    continue
                await source.check()
                services.append(source.directory())
                if isinstance(source, Scenario):
                    exports = source
            if not services:
                raise StartupError(
                    "nothing to mount: configure a Grand Challenge token or Scenario credentials"
                    " (see fsmount mount --help)"
                )

            names = ", ".join(service.name for service in services)
            root_time = metadata.first_seen_many([""])[""]
            root = Directory(
                "", ctx, children=services, xattrs={"services": names}, mtime=root_time
            )
            content = Content(storage, blocks, metadata)
            stack.push_async_callback(content.aclose)  # before the clients its probes use
            ops = Operations(
                root,
                content,
                request_deadline=cfg.timeout + 15,
                inode_budget=cfg.max_entries,
            )
            ctx.replaced = ops.replaced
            commands: dict[str, Command] = {}
            if exports is not None:
                from fsmount.export import BatchExport

                batch = BatchExport(root, exports, storage, content, blocks)
                commands["batch-prefetch"] = batch.run
            collect = status_collector(mountpoint, cache.directory, blocks, stats, apis, ops)
            metrics: list[trio.SocketListener] = []
            if cfg.metrics_port is not None:  # bound now: a port in use fails before mounting
                metrics = await open_metrics_listeners(cfg.metrics_port)
                for listener in metrics:
                    stack.push_async_callback(listener.aclose)
            await _run_fuse(
                ops,
                cfg,
                mountpoint,
                signals,
                ctx,
                ready,
                collect,
                metrics,
                commands,
                hangup_unmounts,
            )


def status_collector(
    mountpoint: Path,
    cache_dir: Path,
    blocks: BlockStore,
    stats: TransferStats,
    apis: Sequence[ApiClient],
    ops: Operations,
) -> Collect:
    """The `fsmount status` document (schema in fsmount/status/document.py): a snapshot."""
    started = time.time()

    def collect() -> dict[str, object]:
        cache = blocks.stats()
        return {
            "mountpoint": str(mountpoint),
            "pid": os.getpid(),
            "started": started,
            "services": [{"name": api.name, "api": redact(api.base_url)} for api in apis],
            "cache": {
                "dir": str(cache_dir),
                "bytes": cache.bytes_held,
                "blocks": cache.blocks_held,
                "budget": cache.budget,
                "hits": cache.hits,
                "misses": cache.misses,
                "bytes_fetched": cache.bytes_fetched,
                "downloads_in_flight": cache.downloads_in_flight,
            },
            "http": {
                "requests": stats.requests,
                "retries": stats.retries,
                "errors": stats.errors,
                "bytes_fetched": stats.bytes_fetched,
                "url_resolves": stats.url_resolves,
                "by_status": {str(code): n for code, n in sorted(stats.by_status.items())},
            },
            "fuse": {**dataclasses.asdict(ops.stats), "entries": ops.entries},
        }

    return collect


async def _run_fuse(
    ops: Operations,
    cfg: Config,
    mountpoint: Path,
    signals: AsyncIterator[int],
    ctx: TreeContext,
    ready: Callable[[], None],
    collect: Collect,
    metrics: Sequence[trio.SocketListener],
    commands: Mapping[str, Command],
    hangup_unmounts: bool,
) -> None:
    try:
        pyfuse3.init(ops, str(mountpoint), fuse_options(cfg))
    except RuntimeError as exc:
        raise StartupError(f"cannot mount at {mountpoint}: {exc}") from None
    clean = False
    stopping = False  # STOPPING=1 sent
    try:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                nonlocal stopping
                async for signum in signals:
                    if signum == signal.SIGHUP and not hangup_unmounts:
                        log.info("SIGHUP: dropping cached listings")
                        ctx.invalidate_all()
                        continue
                    if signum == signal.SIGUSR1:
                        log.warning("SIGUSR1: what every task is waiting on:\n%s", task_stacks())
                        continue
                    log.info("%s: unmounting", signal.Signals(signum).name)
                    stopping = True
                    sd_notify("STOPPING=1")
                    pyfuse3.terminate()
                    return

            async def announce() -> None:
                await trio.sleep(0)  # let pyfuse3.main start answering the kernel first
                log.info("mounted at %s", mountpoint)
                sd_notify("READY=1")
                ready()

            nursery.start_soon(on_signals)
            # Before READY=1, so `fsmount status` answers as soon as the mount is announced.
            status_socket = socket_path(mountpoint)
            await nursery.start(serve_status, status_socket, collect)
            await nursery.start(serve_control, control_path(status_socket), commands)
            if metrics:
                nursery.start_soon(serve_metrics_on, metrics, collect)
            nursery.start_soon(announce)
            nursery.start_soon(raise_kernel_readahead, mountpoint, ops.initialized)
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            if not stopping:  # unmounted from outside (fusermount3 -u, fsmount unmount)
                log.info("unmounted from outside: stopping")
                sd_notify("STOPPING=1")
            nursery.cancel_scope.cancel()
        clean = True
    finally:
        pyfuse3.close(unmount=clean)
