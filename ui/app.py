"""`imglora ui`: the Gradio app to load, blend and compare adapters (issue 5).

build_app(session) assembles the page from one module per tab and passes components explicitly;
launch() opens the model, starts the server with the file and network rules of RELIABILITY.md §3,
prints the address and blocks.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection
from starlette.responses import HTMLResponse, JSONResponse

from imglora.errors import ImgloraError

from .session import Limits, Session, open_model
from .tabs import adapters, compare, export, generate, train

# A library of dozens of adapters stays compact: the tick boxes scroll inside their own box, so the
# enabled adapters' weights above them and the gallery on the right stay in view at 1280x720.
CSS = """
#library [data-testid=checkbox-group] { max-height: 14rem; overflow-y: auto; }
#unusable textarea { font-size: var(--text-sm); }
.adapter-row { margin-bottom: var(--spacing-sm); }
"""


def build_app(session: Session, training: "train.Training | None" = None) -> gr.Blocks:
    """training: the datasets and runs of the Train tab (None: no Train tab)."""
    # Gradio copies every shown image into its cache; files older than a day are removed hourly.
    with gr.Blocks(title="imglora", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        blend = gr.State({})  # this browser tab's blend; never shared (blend.py)
        with gr.Row():
            with gr.Column(scale=2, min_width=380):
                panel, catalogue_changed = adapters.create_ui(session, blend, demo)
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Generate", id="generate"):
                        gen = generate.create_ui(session, blend, panel)
                    with gr.Tab("Compare", id="compare"):
                        grid = compare.create_ui(session, blend, gen)
                    with gr.Tab("Export", id="export"):
                        export.create_ui(session, blend, catalogue_changed)
                    if training is not None:
                        with gr.Tab("Train", id="train"):
                            train.create_ui(session, training, catalogue_changed, demo)

        def choices(listed):
            names = [r[0] for r in listed if r[1] == "ok"]
            return gr.update(choices=names), gr.update(choices=[""] + names)
        panel["rows"].change(choices, panel["rows"], [grid["x_name"], grid["y_name"]], api_visibility="private")
    # Blend edits and listings may overlap; the model's events share concurrency_id "pipeline" and take
    # fair turns in Session.turns (generate.PIPELINE).
    demo.queue(default_concurrency_limit=4, max_size=64)
    return demo


class LoginRequired:
    """With --auth, every route answers 401 without a login, except the login itself.

    Gradio checks the login on most routes but not all (/gradio_api/cancel, /reset, /heartbeat,
    /startup-events, /theme.css, and "/" embeds the API description in its login page), so this ASGI
    middleware checks Gradio's own session cookie in front of all of them. "/" answers with a small login
    form (status 401) that posts to Gradio's /login. The one exception is launch()'s own first call of
    /startup-events.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        gradio_app = scope.get("app")
        if scope["type"] not in ("http", "websocket") or getattr(gradio_app, "auth", None) is None:
            return await self.app(scope, receive, send)
        conn = HTTPConnection(scope)
        cookie = gradio_app.cookie_id
        token = conn.cookies.get(f"access-token-{cookie}") or conn.cookies.get(f"access-token-unsecure-{cookie}")
        path, method = scope["path"], scope.get("method")
        # launch() itself calls startup-events once, without a login; after that it is closed like the rest.
        starting = path == "/gradio_api/startup-events" and not gradio_app.startup_events_triggered
        if token in gradio_app.tokens or (method == "POST" and path in ("/login", "/login/")) or starting:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        if path == "/" and method in ("GET", "HEAD"):
            response = HTMLResponse(LOGIN_PAGE, status_code=401)
        else:
            response = JSONResponse({"detail": "Not authenticated"}, status_code=401)
        await response(scope, receive, send)


LOGIN_PAGE = """<!doctype html><meta charset="utf-8"><title>imglora: log in</title>
<form id="f" style="font-family:sans-serif;margin:4rem auto;width:16rem;display:grid;gap:.5rem">
<b>imglora</b><input name="username" placeholder="user" autofocus required>
<input name="password" type="password" placeholder="password" required><button>Log in</button><span id="m"></span></form>
<script>f.onsubmit = async (e) => { e.preventDefault();
  const r = await fetch("login", {method: "POST", body: new URLSearchParams(new FormData(f))});
  if (r.ok) location.reload(); else m.textContent = "wrong user or password"; };</script>"""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    if not auth:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ImgloraError("--auth must look like user:password", "pass --auth user:password")
    return user, password


def network_policy(host: str, auth: str | None, share: bool) -> tuple[bool, str | None]:
    """(uploads enabled, warning). A1111 disables extension installs when listening publicly; we disable uploads."""
    exposed = share or not is_loopback(host)
    if exposed and not auth:
        where = "a public share link" if share else f"{host}, reachable from other machines"
        return False, (f"warning: the app is served on {where} without --auth; anyone who can reach it can use it. "
                       "Uploads are disabled. Pass --auth user:password to require a login.")
    return True, None


def start(session: Session, demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860,
          auth: str | None = None, share: bool = False, quiet: bool = True, training=None) -> str:
    """Start serving without blocking; returns the local URL."""
    _, url, share_url = demo.launch(
        server_name=host, server_port=port, auth=parse_auth(auth), share=bool(share), prevent_thread_lock=True,
        quiet=quiet, show_error=False, inbrowser=False, css=CSS,
        max_file_size=session.max_upload_bytes if session.uploads_enabled else 1,
        # Gradio serves only its cache: shown images are copies put there (Session.shown), so nothing
        # else in the outputs folder, or wherever it points, can be asked for. The adapters and the model
        # are blocked outright (RELIABILITY.md §3 file rules, U4).
        allowed_paths=[],
        blocked_paths=[str(session.catalogue.folder)] + _model_paths(session)
        + (training.private_paths() if training else []),
        app_kwargs={"middleware": [Middleware(LoginRequired)]},
        footer_links=["api"])
    return share_url or url


def _check_port(host: str, port: int) -> None:
    """A port another program holds is one line before the model loads, not Gradio's traceback after."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ImgloraError(f"cannot listen on {host}:{port} ({e.strerror})",
                               "pass another --port, or stop the program using it") from None


def _model_paths(session: Session) -> list[str]:
    path = session.model.path
    return [str(path.resolve())] if path else []


def launch(model=None, adapters_dir="adapters", host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
           share: bool = False, device: str = "cpu", max_upload_mb: int = 512, outputs_dir="outputs",
           limits: Limits | None = None, model_config=None, datasets_dir=None, captioners_dir=None) -> None:
    """Open the model and serve the app until interrupted; prints the address. datasets_dir: show the Train tab
    on the dataset folders in it (runs, like caption edits, are writes: off where uploads are)."""
    uploads, warning = network_policy(host, auth, share)
    parse_auth(auth)  # a malformed --auth fails before the model is loaded
    for flag, folder in (("--adapters", adapters_dir), ("--outputs", outputs_dir), ("--datasets", datasets_dir)):
        if folder is None:
            continue
        if Path(folder).exists() and not Path(folder).is_dir():
            raise ImgloraError(f"{flag} is a file, not a folder", f"pass a folder to {flag}", path=folder)
    _check_port(host, port)
    if warning:
        print(f"imglora ui: {warning}" + (" The Train tab is off too." if datasets_dir else ""), file=sys.stderr)
    session = Session(open_model(model, device, model_config), adapters_dir, outputs_dir, uploads_enabled=uploads,
                      max_upload_mb=max_upload_mb, limits=limits)
    training = train.Training.open(session, datasets_dir, captioners_dir, model, model_config) \
        if datasets_dir and uploads else None
    demo = build_app(session, training)
    url = start(session, demo, host, port, auth, share, training=training)
    usable = len(session.catalogue.names())
    where = f"; datasets: {training.datasets.root}" if training else ""
    print(f"imglora ui: {url}  (adapters: {session.catalogue.folder}, {usable} usable; outputs: {session.outputs}"
          f"{where})", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
        if training is not None:
            training.jobs.shutdown()  # a running run saves its checkpoint; Resume continues it next time
