"""`cxrfast serve`: a small local web page to try a trained model on one X-ray at a time.

One page (HTML and JavaScript in this file, nothing fetched from the internet) where one drops or picks an X-ray
and sees the calibrated class probabilities, the predicted label and the occlusion heatmap, with the model's
name, its test balanced accuracy and a reminder that this is a research tool. `POST /api/predict` (multipart
field `file`) answers JSON: {probabilities, predicted, warning, heatmap_png_base64, image_png_base64, filename, model,
model_changed}, where `warning` is null, or says why the image looks like no radiograph (a colour photo or chart, an
inverted film: as predict flags it), and `model_changed` is null, or says that the run folder was deleted or
retrained into since the server loaded its model (which it keeps answering with, until restarted); `?heatmap=0`
leaves the heatmap out (null). The occlusion heatmap costs hundreds of forward passes (seconds to a minute per image
at 224 px on a CPU), so the page asks for the probabilities first and the heatmap second.

It binds to 127.0.0.1 by default: the page has no login, so only this computer can reach it. Uploads are read
with the toolkit's reader: a file that is not a readable X-ray gets a 4xx answer with the reason, and one above
`MAX_UPLOAD_BYTES` gets 413 before it is stored, one that goes silent for `UPLOAD_IDLE_SECONDS`, or has not arrived
whole within `UPLOAD_SECONDS`, a 408; a connection that has not sent a request's headers within `HEADER_SECONDS` is
closed.
Predictions run in worker threads. Heatmaps take turns, one sweep at a time, and a heatmap whose page has moved
on (a newer upload aborts the older request) is dropped when its turn comes instead of computed, or stopped between
two batches of its sweep; probabilities never wait behind heatmaps. Ctrl-C or SIGTERM stops the sweep in progress
the same way and answers the queued heatmaps 503.

Any web page open in the same browser can send requests to a local server. So a request whose `Origin` is another
site is refused (403), and a server bound to loopback answers only requests addressed to a loopback name: a page
whose own domain is made to resolve to 127.0.0.1 ("DNS rebinding") would otherwise read its answers.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import html
import json
import socket
import tempfile
import threading
from contextlib import aclosing
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from cxr_fast.calibration import softmax
from cxr_fast.data.inversion import upright_correlation
from cxr_fast.data.io import IMAGE_SUFFIXES, ImageReadError, read_image_and_colour
from cxr_fast.errors import CxrFastError, storage_problem
from cxr_fast.memory import give_back_freed_memory
from cxr_fast.predict import image_warning, load_runner, model_image, model_input, occlusion_map, overlay_png

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # a radiograph is a few MB even as uncompressed DICOM
UPLOAD_IDLE_SECONDS = 60.0  # an upload that sends nothing for this long is given up (a client gone without a word)
# An upload must arrive whole within this: a byte sent every 50 s passed the idle limit and held its connection and
# temporary file for as long as serve ran. A fixed limit rather than a minimum rate, since it is one number a user
# can be told; 10 min still lets the largest upload allowed (20 MB) through at 35 KB/s, far below any LAN or Wi-Fi.
UPLOAD_SECONDS = 600.0
# A connection must send a request's headers (a few hundred bytes, one packet from a browser) within this, or it is
# closed: uvicorn has no such limit, so connections opened and left silent, or sending headers a byte at a time, were
# held for ever, each with a file descriptor. An idle connection between requests is closed after uvicorn's 5 s.
HEADER_SECONDS = 20.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class UploadTooLarge(Exception):
    pass


class UploadStalled(Exception):
    pass


class UploadTooSlow(Exception):
    pass


class SweepStopped(Exception):
    """An occlusion sweep stopped between two batches: its client left, or the server is stopping."""


class StoppableRunner:
    """`runner`, whose torch module raises `SweepStopped` before each batch of the sweep once `stop()` is true.

    A sweep is hundreds of forward passes (seconds to a minute on a CPU) in a worker thread, which nothing can
    interrupt from outside: without this, a page closed mid-sweep, or Ctrl-C, waited for it to finish, and Ctrl-C
    for every queued heatmap after it."""

    def __init__(self, runner, stop):
        self.runner, self.stop = runner, stop

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def torch_module(self):
        import torch

        stop = self.stop

        class Stoppable(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner  # a submodule, so that the sweep's eval() reaches it, as without the wrapper,
                self.train(inner.training)  # and its restoring train(...) leaves it in the mode it was in

            def forward(self, x):
                if stop():
                    raise SweepStopped
                return self.inner(x)

        return Stoppable(self.runner.torch_module())


def host_name(host: str) -> str:
    """'127.0.0.1:8000' → '127.0.0.1', '[::1]:8000' → '::1': the name in a Host header or URL authority."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def request_problem(host: str, origin: str | None, allowed_hosts: tuple[str, ...] | None) -> str | None:
    """Why a request must be refused before it reaches the model, or None. `allowed_hosts` None: any Host."""
    if allowed_hosts is not None and host_name(host) not in allowed_hosts:
        return (f"this server answers only requests to {', '.join(allowed_hosts)}, not to {host or 'no host'!r} "
                f"(a page from another site may be trying to reach it)")
    if origin and origin != "null" and urlsplit(origin).netloc.lower() != host.strip().lower():
        return f"requests from pages of another site ({origin}) are refused"
    return None


class SameSiteOnly:
    """ASGI guard: requests from other sites' pages, or addressed to a name the server does not answer to, get 403."""

    def __init__(self, app, allowed_hosts: tuple[str, ...] | None):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            from starlette.datastructures import Headers
            from starlette.responses import JSONResponse

            headers = Headers(scope=scope)
            problem = request_problem(headers.get("host", ""), headers.get("origin"), self.allowed_hosts)
            if problem is not None:
                await JSONResponse({"error": problem}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def evaluated_test_metrics(run_dir: Path) -> dict | None:
    """The run's evaluation on its own test split (`cxrfast evaluate`), or None when it was not evaluated."""
    found = sorted(Path(run_dir).glob("eval/*-test/metrics.json"))
    if not found:
        return None
    try:
        metrics = json.loads(found[0].read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    # The page formats these as numbers: an edited or damaged file is shown as no evaluation, not a crash at start.
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    ci = metrics.get("balanced_accuracy_ci") if isinstance(metrics, dict) else None
    if not (isinstance(metrics, dict) and number(metrics.get("balanced_accuracy"))
            and (ci is None or (isinstance(ci, list) and len(ci) == 2 and all(map(number, ci))))
            and (metrics.get("n") is None or number(metrics["n"]))):
        return None
    return metrics


def model_files(runner) -> list[Path]:
    """The files `runner` was loaded from: the run bundle's, or the ONNX export's with `--runtime onnx`."""
    from cxr_fast.export import ONNX_FILE, PREPROCESSING_FILE

    names = (ONNX_FILE, PREPROCESSING_FILE) if runner.runtime == "onnx" else ("config.json", "model.safetensors")
    return [Path(runner.path) / name for name in names]


def file_stamps(paths: list[Path]) -> tuple:
    """(inode, size, modification time) of each file, None for one that is gone: a stat each, cheap per request."""
    stamps = []
    for path in paths:
        try:
            found = path.stat()
        except OSError:
            stamps.append(None)
        else:
            stamps.append((found.st_ino, found.st_size, found.st_mtime_ns))
    return tuple(stamps)


def model_changed(runner, paths: list[Path], loaded: tuple) -> str | None:
    """Why the answers no longer come from the model now in the run folder, or None while it is the one loaded.

    The model is loaded once, at start: a run folder deleted, or retrained into, while the server runs was served
    on with the old model without a word, while `cxrfast predict` on the same folder gave other probabilities."""
    now = file_stamps(paths)
    if now == loaded:
        return None
    gone = all(stamp is None for stamp in now)
    how = "deleted or moved" if gone else "changed (retrained, re-exported or replaced)"
    then = (f"the model in {runner.path} was {how} after this server started; these answers still come from the model "
            f"it loaded then ({runner.name}, as named above)")
    return then + ("" if gone else ": restart `cxrfast serve` to use the new one")


def model_card(runner) -> dict:
    metrics = evaluated_test_metrics(runner.path)
    card = {"name": runner.name, "arch": runner.arch, "runtime": runner.runtime, "classes": runner.classes,
            "size": runner.size, "test_balanced_accuracy": None, "test_balanced_accuracy_ci": None,
            "test_images": None, "evaluated": metrics is not None}
    if metrics is not None:
        card.update(test_balanced_accuracy=metrics.get("balanced_accuracy"),
                    test_balanced_accuracy_ci=metrics.get("balanced_accuracy_ci"), test_images=metrics.get("n"))
    return card


def predict_upload(runner, path: Path, heatmap: bool = True) -> dict:
    """One file → probabilities, predicted class, warning (None for a grey image), heatmap (None without `heatmap`)
    and the image as the model saw it (PNGs in base64)."""
    image, colour = read_image_and_colour(path)
    pixels = model_image(image, runner.size)
    x = model_input(pixels, runner.n_in, runner.mean, runner.std)
    probs = softmax(runner.logits(x[None]), runner.temperature)[0]
    k = int(probs.argmax())
    overlay = overlay_png(pixels, occlusion_map(runner, x, k)) if heatmap else None
    return {"probabilities": {c: float(p) for c, p in zip(runner.classes, probs)},
            "predicted": runner.classes[k],
            "warning": image_warning(colour, upright_correlation(image)),
            "heatmap_png_base64": None if overlay is None else base64.b64encode(overlay).decode("ascii"),
            "image_png_base64": base64.b64encode(_png(pixels)).decode("ascii")}


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def _limited(stream, limit: int, idle_seconds: float = UPLOAD_IDLE_SECONDS,
                   total_seconds: float = UPLOAD_SECONDS):
    """The body's chunks, up to `limit` bytes (then `UploadTooLarge`), each within `idle_seconds` of the last (then
    `UploadStalled`), all within `total_seconds` (then `UploadTooSlow`): uvicorn waits for a body forever, so a
    client that went silent mid-upload (a laptop put to sleep, a dropped network), or sent a byte now and then, held
    its connection and file descriptor for as long as the server ran."""
    loop = asyncio.get_running_loop()
    deadline, total, chunks = loop.time() + total_seconds, 0, aiter(stream)
    while True:
        left = deadline - loop.time()
        try:
            chunk = await asyncio.wait_for(anext(chunks), min(idle_seconds, max(left, 0)))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise (UploadTooSlow if left < idle_seconds else UploadStalled) from None
        total += len(chunk)
        if total > limit:
            raise UploadTooLarge
        yield chunk


def create_app(run_dir: str | Path | None = None, runtime: str = "torch", *, device: str = "cpu", runner=None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, allowed_hosts: tuple[str, ...] | None = None,
               upload_idle_seconds: float = UPLOAD_IDLE_SECONDS, upload_seconds: float = UPLOAD_SECONDS):
    """The Starlette app for `run_dir` (or an already loaded `runner`). The model loads here, once.

    `allowed_hosts`: the names requests may be addressed to (`serve` passes `LOOPBACK` when bound to loopback);
    None answers any. Requests from another site's page are refused either way."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.formparsers import MultiPartParser
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    runner = runner if runner is not None else load_runner(run_dir, runtime, device)
    watched = model_files(runner)
    loaded = file_stamps(watched)  # just after loading; a change made while it loaded is seen at the next restart
    shown = {"card": model_card(runner)}
    shown["page"] = render_page(shown["card"], max_upload_bytes)

    def current(changed: str | None) -> dict:
        """The model card and the page, with an evaluation written since the start (`cxrfast evaluate` while serving:
        the page said "not evaluated" until restarted), as long as the model is the one loaded: after a retrain, the
        evaluation in the folder is another model's."""
        if changed is None:
            card = model_card(runner)
            if card != shown["card"]:
                shown.update(card=card, page=render_page(card, max_upload_bytes))
        return shown
    heatmap_turn = asyncio.Lock()  # one occlusion sweep at a time: each keeps the CPU busy for seconds to a minute
    stopping = threading.Event()  # set by `serve` on Ctrl-C or SIGTERM: sweeps stop, queued heatmaps are refused

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def index(request: Request):
        changed = model_changed(runner, watched, loaded)
        # the note shows from the page's first view, not only once someone has uploaded an image
        return HTMLResponse(current(changed)["page"] if changed is None else
                            render_page(shown["card"], max_upload_bytes, changed))

    async def model(request: Request):
        changed = model_changed(runner, watched, loaded)
        return JSONResponse({**current(changed)["card"], "model_changed": changed})

    async def api_predict(request: Request):
        limit_text = f"{max_upload_bytes / 1024 / 1024:.0f} MB"
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_upload_bytes + 64 * 1024:
            return error(413, f"upload too large: at most {limit_text}")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return error(400, "send the image as multipart/form-data in a field named 'file'")
        try:
            async with aclosing(_limited(request.stream(), max_upload_bytes + 64 * 1024, upload_idle_seconds,
                                         upload_seconds)) as stream:
                form = await MultiPartParser(request.headers, stream, max_files=1, max_fields=5).parse()
        except UploadTooLarge:
            return error(413, f"upload too large: at most {limit_text}")
        except UploadStalled:
            return error(408, f"the upload stopped: nothing arrived for {upload_idle_seconds:g} s")
        except UploadTooSlow:  # the parser has closed (so deleted) its temporary file on the way out
            return error(408, f"the upload took too long: it must arrive whole within {upload_seconds:g} s")
        except Exception as e:  # noqa: BLE001 - python-multipart raises several types for malformed bodies
            if storage_problem(e) is not None:  # a large upload spools to disk: a full one is the server's fault
                return error(507, f"the server cannot store the upload ({storage_problem(e)})")
            return error(400, f"could not read the upload ({getattr(e, 'message', None) or e})")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            await form.close()
            return error(400, "no file: send the image in a field named 'file'")
        try:
            data = await upload.read(max_upload_bytes + 1)
        finally:
            await form.close()
        if len(data) > max_upload_bytes:
            return error(413, f"upload too large: at most {limit_text}")
        filename = Path(upload.filename or "upload").name
        # Keep an image suffix (the reader tells DICOM by suffix or preamble); anything else is read by content.
        suffix = Path(filename).suffix.lower() if Path(filename).suffix.lower() in IMAGE_SUFFIXES else ""
        with_heatmap = request.query_params.get("heatmap", "1").lower() not in ("0", "false", "no")
        try:
            if not with_heatmap:  # one forward pass: never queued behind a heatmap's hundreds
                result = await run_in_threadpool(_predict_bytes, runner, data, suffix, False)
            else:
                async with heatmap_turn:
                    # Abandoned sweeps once ran anyway, one after another, and later uploads waited minutes.
                    if stopping.is_set():
                        return error(503, "the server is stopping")
                    if await request.is_disconnected():
                        return error(499, "the client left before its heatmap's turn")
                    result = await _sweep(request, runner, data, suffix, stopping)
        except SweepStopped:
            if stopping.is_set():
                return error(503, "the server is stopping")
            return error(499, "the client left during its heatmap")
        except ImageReadError as e:
            return error(422, f"{filename}: {e.explanation}")
        except OSError as e:  # the temporary copy on a full disk: an answer saying so, not a bare 500 and a traceback
            if storage_problem(e) is None:
                raise
            return error(507, f"the server cannot store the upload ({storage_problem(e)})")
        changed = model_changed(runner, watched, loaded)
        return JSONResponse({**result, "filename": filename, "model": current(changed)["card"],
                             "model_changed": changed})

    app = Starlette(routes=[Route("/", index), Route("/api/model", model),
                            Route("/api/predict", api_predict, methods=["POST"])],
                    middleware=[Middleware(SameSiteOnly, allowed_hosts=allowed_hosts)])
    app.state.stopping = stopping
    return app


async def _sweep(request, runner, data: bytes, suffix: str, stopping: threading.Event) -> dict:
    """`_predict_bytes` with the heatmap, stopped between two batches of its sweep once the client has left or the
    server is stopping (`SweepStopped`), so that the next heatmap, or the shutdown, need not wait for it."""
    from starlette.concurrency import run_in_threadpool

    gone = threading.Event()
    work = asyncio.ensure_future(run_in_threadpool(
        _predict_bytes, StoppableRunner(runner, lambda: gone.is_set() or stopping.is_set()), data, suffix, True))
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=0.25)
            if not work.done() and await request.is_disconnected():
                gone.set()
        return work.result()
    finally:
        if not work.done():  # this request cancelled (a forced shutdown): its sweep stops too, and its SweepStopped
            gone.set()  # is collected here rather than logged as "Task exception was never retrieved"
            work.add_done_callback(lambda done: done.cancelled() or done.exception())


def _predict_bytes(runner, data: bytes, suffix: str, heatmap: bool) -> dict:
    # Runners may be called from several threads at once: the torch model stays in eval mode under no_grad, and an
    # ONNX Runtime session's run() is thread-safe.
    try:
        with tempfile.TemporaryDirectory(prefix="cxrfast-upload-") as folder:
            path = Path(folder) / f"upload{suffix}"
            path.write_bytes(data)
            return predict_upload(runner, path, heatmap)
    finally:
        give_back_freed_memory()  # the cxrfast command keeps freed memory, which suits one job, not days of them


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, runtime: str = "torch",
          on_ready=None, device: str = "cpu") -> None:
    """Load the model and serve until interrupted (Ctrl+C, or a notebook's stop button, which ends the cell
    quietly)."""
    if not 0 < port < 65536:
        raise CxrFastError(f"--port must be between 1 and 65535, got {port}")
    app = create_app(run_dir, runtime, device=device, allowed_hosts=LOOPBACK if host in LOOPBACK else None)
    listener = _listen(host, port)  # bound here, so a busy port is an error before anything says "serving"
    if on_ready is not None:
        on_ready(f"http://{'[' + host + ']' if ':' in host else host}:{port}/", host in LOOPBACK)
    server = make_server(app)
    with listener:
        if not _loop_running():
            server.run(sockets=[listener])
            return
        # A Jupyter kernel runs each cell inside its own event loop, beside which uvicorn's cannot run ("Cannot run
        # the event loop while another loop is running"): the server runs in a thread, until the kernel is interrupted
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="cxrfast-serve", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.2)
        except KeyboardInterrupt:  # the notebook's stop button: the server stops, and the cell ends quietly
            app.state.stopping.set()
            server.should_exit = True
            thread.join()


def make_server(app, header_seconds: float = HEADER_SECONDS):
    """A uvicorn server for `app` whose Ctrl-C or SIGTERM also stops the heatmap being computed and refuses the
    queued ones (503): uvicorn waits for every request in progress before it exits, which was minutes with a few
    heatmaps queued at 224 px. A connection that has not sent a request's headers `header_seconds` after it opened,
    or after the first byte of its next request, is closed."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.stopping.set()
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, log_level="warning", http=header_deadline(header_seconds)))


def header_deadline(seconds: float):
    """uvicorn's HTTP protocol (httptools', or h11's without it), which closes a connection whose request headers
    are not complete `seconds` after it opened or after the first byte of its next request. Once a request's headers
    are in, the app's own limits apply (`UPLOAD_IDLE_SECONDS`, `UPLOAD_SECONDS`), and between requests uvicorn's
    keep-alive timeout. It reads uvicorn's protocol attributes (`cycle`, `loop`, `transport`): tests/test_serve.py
    passed with both protocols on uvicorn 0.30.0, the oldest allowed, and 0.54.0."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderDeadline(AutoHTTPProtocol):
        timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.timer = self.loop.call_later(seconds, self.headers_late)

        def data_received(self, data: bytes) -> None:
            if self.timer is None and (self.cycle is None or self.cycle.response_complete):
                self.timer = self.loop.call_later(seconds, self.headers_late)  # the next request begins
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request's headers are complete: it is the app's now
                self.stop_timer()

        def connection_lost(self, exc) -> None:
            self.stop_timer()
            super().connection_lost(exc)

        def stop_timer(self) -> None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

        def headers_late(self) -> None:
            self.timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line error (uvicorn would log the failure and exit with code 3)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
    except OSError as e:
        raise CxrFastError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait
        listener.bind(address)
        listener.listen(128)
    except OSError as e:
        listener.close()
        hint = "; is another server using it? choose another --port" if e.errno == errno.EADDRINUSE else ""
        raise CxrFastError(f"cannot listen on {host}:{port} ({e.strerror or e}){hint}") from None
    return listener


# ---------------------------------------------------------------------------------------------- page


def render_page(card: dict, max_upload_bytes: int, changed: str | None = None) -> str:
    """The page for `card`; `changed` (`model_changed`'s note) shows at its top when given."""
    from cxr_fast.report import DISCLAIMER

    if card["evaluated"] and card["test_balanced_accuracy"] is not None:
        quality = f"test balanced accuracy {card['test_balanced_accuracy']:.3f}"
        ci = card.get("test_balanced_accuracy_ci")
        if ci:
            quality += f" (95 % CI {ci[0]:.3f}–{ci[1]:.3f}"
            quality += f", {card['test_images']} images)" if card.get("test_images") else ")"
    else:
        quality = "not evaluated (run `cxrfast evaluate` on it)"
    values = {
        "TITLE": html.escape(f"cxrfast — {card['name']}"),
        "MODEL": html.escape(f"{card['name']} ({card['arch']}, {card['size']} px, {card['runtime']})"),
        "QUALITY": html.escape(quality),
        "DISCLAIMER": html.escape(DISCLAIMER),
        "MAX_BYTES": str(int(max_upload_bytes)),
        "MAX_MB": f"{max_upload_bytes / 1024 / 1024:.0f}",
        "CHANGED": html.escape(f"Note: {changed}.") if changed else "",
        "CHANGED_HIDDEN": "" if changed else " hidden",
    }
    page = PAGE
    for key, value in values.items():
        page = page.replace("{{" + key + "}}", value)
    return page


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{TITLE}}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 920px; padding: 16px; color: #222; }
.disclaimer { background: #fff3cd; border-radius: 8px; padding: 10px 14px; }
#drop { border: 2px dashed #888; border-radius: 12px; padding: 28px; text-align: center; margin: 16px 0;
        cursor: pointer; }
#drop.over { background: #eef4ff; border-color: #3366cc; }
.row { display: flex; gap: 16px; flex-wrap: wrap; }
figure { margin: 0; flex: 1 1 300px; } figure img { width: 100%; image-rendering: auto; border-radius: 6px; }
figcaption { font-size: .85rem; color: #555; }
.bar { display: flex; align-items: center; gap: 8px; margin: 4px 0; }
.bar .name { width: 110px; } .bar .track { flex: 1; background: #eee; border-radius: 4px; height: 18px; }
.bar .fill { background: #3366cc; height: 18px; border-radius: 4px; } .bar.top .fill { background: #cc3333; }
.bar .value { width: 60px; text-align: right; font-variant-numeric: tabular-nums; }
#error { color: #b00020; font-weight: bold; } #status { color: #555; }
#warning, #model-changed { background: #fde2e1; border-radius: 8px; padding: 10px 14px; font-weight: bold; }
.meta { color: #444; font-size: .95rem; }
</style></head>
<body>
<h1>Chest X-ray classifier</h1>
<p class="disclaimer"><strong>{{DISCLAIMER}}</strong> The probabilities come from a model trained on a limited
dataset; they can be confidently wrong on images unlike its training data.</p>
<p class="meta">Model: <strong id="model-name">{{MODEL}}</strong><br>Quality: <span id="model-quality">{{QUALITY}}</span></p>
<div id="drop" tabindex="0">Drop a chest X-ray here (PNG, JPEG or DICOM, at most {{MAX_MB}} MB), or
<label><u>pick a file</u><input id="file" type="file" hidden></label>.</div>
<p id="status"></p><p id="error" role="alert"></p>
<p id="model-changed" role="alert"{{CHANGED_HIDDEN}}>{{CHANGED}}</p>
<section id="result" hidden>
<p id="warning" role="alert" hidden></p>
<h2>Predicted: <span id="predicted"></span></h2>
<div id="bars"></div>
<div class="row">
<figure><img id="xray" alt="the X-ray as the model sees it"><figcaption>The X-ray as the model sees it.</figcaption></figure>
<figure><img id="heatmap" alt="occlusion heatmap"><figcaption id="heatmap-caption"></figcaption></figure>
</div>
</section>
<script>
const MAX_BYTES = {{MAX_BYTES}};
const drop = document.getElementById("drop"), input = document.getElementById("file");
const show = (id, text) => { document.getElementById(id).textContent = text; };
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; }
let current = 0;  // a newer upload makes the answers for older ones stale
let pending = new AbortController();  // ... and aborts their requests, so the server drops their heatmaps
async function ask(file, heatmap, signal) {
  const body = new FormData(); body.append("file", file, file.name);
  const response = await fetch("api/predict?heatmap=" + (heatmap ? "1" : "0"), { method: "POST", body, signal });
  let answer = {};
  try { answer = await response.json(); } catch (e) { /* not JSON: keep the status below */ }
  if (!response.ok) throw new Error(answer.error || ("server answered " + response.status));
  return answer;
}
async function send(file) {
  const id = ++current;
  pending.abort(); pending = new AbortController(); const signal = pending.signal;
  show("error", ""); document.getElementById("result").hidden = true;
  if (file.size > MAX_BYTES) { show("error", file.name + ": too large (at most {{MAX_MB}} MB)"); return; }
  show("status", "Analysing " + file.name + "…");
  let answer;
  try { answer = await ask(file, false, signal); } catch (e) { if (id === current) { show("status", ""); show("error", e.message); } return; }
  if (id !== current) return;
  show("status", "Result for " + file.name + ":");
  const changed = document.getElementById("model-changed");
  changed.textContent = answer.model_changed ? "Note: " + answer.model_changed + "." : ""; changed.hidden = !answer.model_changed;
  show("predicted", answer.predicted);
  const warning = document.getElementById("warning");
  warning.textContent = answer.warning ? "Warning: " + answer.warning + "." : ""; warning.hidden = !answer.warning;
  const bars = document.getElementById("bars"); bars.replaceChildren();
  for (const [name, p] of Object.entries(answer.probabilities)) {
    const row = el("div", "bar" + (name === answer.predicted ? " top" : ""));
    row.dataset.label = name; row.dataset.probability = p;
    const track = el("div", "track"), fill = el("div", "fill");
    fill.style.width = (100 * p).toFixed(1) + "%"; track.append(fill);
    row.append(el("span", "name", name), track, el("span", "value", (100 * p).toFixed(1) + " %"));
    bars.append(row);
  }
  document.getElementById("xray").src = "data:image/png;base64," + answer.image_png_base64;
  const heatmap = document.getElementById("heatmap");
  heatmap.removeAttribute("src"); heatmap.hidden = true;
  show("heatmap-caption", "Computing the occlusion heatmap (it can take a minute on a CPU)…");
  document.getElementById("result").hidden = false;
  try { answer = await ask(file, true, signal); } catch (e) { if (id === current) show("heatmap-caption", "No heatmap: " + e.message); return; }
  if (id !== current) return;
  heatmap.src = "data:image/png;base64," + answer.heatmap_png_base64; heatmap.hidden = false;
  show("heatmap-caption", "Occlusion heatmap for " + answer.predicted +
       ": red areas raised this prediction, blue areas lowered it. Evidence outside the lungs is a warning sign.");
}
input.addEventListener("change", () => { if (input.files.length) send(input.files[0]); });
drop.addEventListener("click", (e) => { if (e.target === drop) input.click(); });
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
["dragenter", "dragover"].forEach(t => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach(t => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]); });
</script>
</body></html>
"""
