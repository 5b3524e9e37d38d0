"""`imglora ui`: the Gradio app to load, blend and compare adapters (issue 5).

build_app(session) assembles the page from one module per tab and passes components explicitly;
launch() opens the model, starts the server with the file and network rules of RELIABILITY.md §3,
prints the address and blocks.
"""

from __future__ import annotations

import ipaddress
import socket
import sys

import gradio as gr

from imglora.errors import ImgloraError

from .session import Session, open_model
from .tabs import adapters, compare, export, generate


def build_app(session: Session) -> gr.Blocks:
    # Gradio copies every shown image into its cache; files older than a day are removed hourly.
    with gr.Blocks(title="imglora", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown("## imglora: blend and compare LoRA adapters")
        blend = gr.State({})  # this browser tab's blend; never shared (blend.py)
        with gr.Row():
            with gr.Column(scale=2):
                rows, catalogue_changed = adapters.create_ui(session, blend, demo)
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Generate", id="generate"):
                        gen = generate.create_ui(session, blend)
                    with gr.Tab("Compare", id="compare"):
                        grid = compare.create_ui(session, blend, gen)
                    with gr.Tab("Export", id="export"):
                        export.create_ui(session, blend, catalogue_changed)

        def choices(listed):
            names = [r[0] for r in listed if r[1] == "ok"]
            return gr.update(choices=names), gr.update(choices=[""] + names)
        rows.change(choices, rows, [grid["x_name"], grid["y_name"]], api_visibility="private")
        # A page (re)load lists the folder as it is now.
        demo.load(**catalogue_changed)
    # Listing, cards and blend edits may overlap; every pipeline event has concurrency_id="pipeline", limit 1.
    demo.queue(default_concurrency_limit=4, max_size=64)
    return demo


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
          auth: str | None = None, share: bool = False, quiet: bool = True) -> str:
    """Start serving without blocking; returns the local URL."""
    _, url, share_url = demo.launch(
        server_name=host, server_port=port, auth=parse_auth(auth), share=bool(share), prevent_thread_lock=True,
        quiet=quiet, show_error=False, inbrowser=False,
        max_file_size=session.max_upload_bytes if session.uploads_enabled else 1,
        # Only the outputs folder is served besides Gradio's own cache; the adapters and the model are
        # never files the browser can ask for (RELIABILITY.md §3 file rules, U4).
        allowed_paths=[str(session.outputs)],
        blocked_paths=[str(session.catalogue.folder)] + _model_paths(session),
        footer_links=["api"])
    return share_url or url


def _model_paths(session: Session) -> list[str]:
    path = session.model.path
    return [str(path.resolve())] if path else []


def launch(model=None, adapters_dir="adapters", host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
           share: bool = False, device: str = "cpu", max_upload_mb: int = 512, outputs_dir="outputs") -> None:
    """Open the model and serve the app until interrupted; prints the address."""
    uploads, warning = network_policy(host, auth, share)
    parse_auth(auth)  # a malformed --auth fails before the model is loaded
    if warning:
        print(f"imglora ui: {warning}", file=sys.stderr)
    session = Session(open_model(model, device), adapters_dir, outputs_dir, uploads_enabled=uploads, max_upload_mb=max_upload_mb)
    demo = build_app(session)
    url = start(session, demo, host, port, auth, share)
    usable = len(session.catalogue.names())
    print(f"imglora ui: {url}  (adapters: {session.catalogue.folder}, {usable} usable; outputs: {session.outputs})",
          flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
