"""Errors reach the user as a message in the page, never as a traceback (issue 5).

Handlers are plain functions that raise ImgloraError; `in_page` wraps them for Gradio, turning a known
error into gr.Error (a toast in the page, and an AppError for API clients) and an unexpected one into
a short line, with the traceback going to the server log only. Messages can quote a file's text (a
tensor name, a dtype) and Gradio renders toasts as HTML, so they are escaped: shown as text, never markup.
"""

from __future__ import annotations

import functools
import html
import logging

import gradio as gr
import torch

from imglora.errors import ImgloraError
from imglora.lora.adapters import AdapterError

from .session import Job

log = logging.getLogger("imglora.ui")


def in_page(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ImgloraError, AdapterError) as e:
            raise gr.Error(_text(str(e)), print_exception=False) from None
        except torch.OutOfMemoryError:
            raise gr.Error("out of GPU memory — use fewer images, a smaller size, or fewer grid cells",
                           print_exception=False) from None
        except Exception as e:  # a bug: say what happened, keep the details on the server
            log.exception("error in %s", getattr(fn, "__name__", "handler"))
            raise gr.Error(_text(f"internal error ({type(e).__name__}: {str(e)[:200]}); details are in the server "
                                 "log"), print_exception=False) from None
    return wrapped


def _text(message: str) -> str:
    return html.escape(message, quote=False)


def warn(message: str) -> None:
    """A toast that does not stop the handler (a dropped adapter, a setting left as it was)."""
    gr.Warning(_text(message))


def user_of(request) -> str:
    """Whose request: the login name, else the browser tab's (or API client's) session."""
    return getattr(request, "username", None) or getattr(request, "session_hash", None) or "local"


def on_pipeline(fn):
    """fn(*inputs, job=Job) as a Gradio handler: the job is this user's, and reports to the page's progress bar.

    Gradio passes the request and the progress tracker by position (their annotation and default say
    which), then the inputs."""
    def handler(request: gr.Request, progress=gr.Progress(), *inputs):
        def report(text, done, total):
            progress((done, total) if total else 0.0, desc=text, unit="steps")
        return fn(*inputs, job=Job(user_of(request), report))
    return in_page(handler)
