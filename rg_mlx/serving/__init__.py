"""The Gradio-free serving layer: one model, one MLX worker thread, many chat sessions.

- `Worker` (worker.py): the one thread that runs MLX, with a fair queue of streamed jobs and
  short calls that run between two tokens.
- `ModelHolder` (model.py): the loaded model; load and switch (on the worker, cancelling every job
  and resetting every session), read under a lock.
- `SessionRegistry`, `Session`, `SessionView`, `Trace` (sessions.py): the chats by key, their
  expiry, each session's lock and the snapshots a front end reads.
- `ChatService` (service.py): the three together, the calls a front end makes (send, regenerate,
  undo, clear, restore, stop, follow a reply's `Progress`).
"""

from .model import Loaded, ModelHolder
from .service import ChatService, NoModel, Progress, Reply
from .sessions import IDLE_TTL_S, Session, SessionRegistry, SessionView, Trace, now_iso
from .worker import DONE, Job, Worker

__all__ = [
    "DONE",
    "IDLE_TTL_S",
    "ChatService",
    "Job",
    "Loaded",
    "ModelHolder",
    "NoModel",
    "Progress",
    "Reply",
    "Session",
    "SessionRegistry",
    "SessionView",
    "Trace",
    "Worker",
    "now_iso",
]
