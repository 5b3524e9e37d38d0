"""Errors reach the user as a message in the page, never as a traceback (issue 5).

Handlers are plain functions that raise ImgloraError; `in_page` wraps them for Gradio, turning a known
error into gr.Error (a toast in the page, and an AppError for API clients) and an unexpected one into
a short line, with the traceback going to the server log only.
"""

from __future__ import annotations

import functools
import logging

import gradio as gr
import torch

from imglora.errors import ImgloraError
from imglora.lora.adapters import AdapterError

log = logging.getLogger("imglora.ui")


def in_page(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ImgloraError, AdapterError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        except torch.OutOfMemoryError:
            raise gr.Error("out of GPU memory — use fewer images, a smaller size, or fewer grid cells",
                           print_exception=False) from None
        except Exception as e:  # a bug: say what happened, keep the details on the server
            log.exception("error in %s", getattr(fn, "__name__", "handler"))
            raise gr.Error(f"internal error ({type(e).__name__}: {str(e)[:200]}); details are in the server log",
                           print_exception=False) from None
    return wrapped
