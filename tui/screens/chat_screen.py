"""Chat with one format: the model is loaded once, every adapter is loaded once, and the adapter
picked in the list is applied per message (hot swap, no reload)."""

from __future__ import annotations

import threading
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, RadioButton, RadioSet, Static

from edge_lora.serving.conversation import Conversation
from edge_lora.core.errors import EdgeLoraError
from edge_lora.tui.services import ChatRuntime, RuntimeFactory
from edge_lora.tui.view_model import AdapterEntry

BASE_CHOICE = "none (base)"
MAX_REPLY_TOKENS = 128


class ChatScreen(Screen[None]):
    CSS_PATH = "chat_screen.tcss"
    BINDINGS = [Binding("escape", "close_chat", "Back"), Binding("ctrl+t", "next_adapter", "Next adapter"),
                Binding("ctrl+r", "reset", "New chat")]

    class ReplyGrew(Message, bubble=False):
        """The reply so far, posted by the generating thread per token without waiting for the UI
        (call_from_thread would block generation on every redraw)."""

        def __init__(self, reply: Static, label: str, text: str) -> None:
            super().__init__()
            self.reply, self.label, self.text = reply, label, text

        def can_replace(self, message: Message) -> bool:
            # A later text of the same reply holds this one: a UI that fell behind skips to it.
            return isinstance(message, ChatScreen.ReplyGrew) and message.reply is self.reply

    def __init__(self, model_path: Path, n_ctx: int, adapters: list[AdapterEntry], runtime_factory: RuntimeFactory,
                 max_tokens: int = MAX_REPLY_TOKENS) -> None:
        super().__init__()
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.adapters = adapters
        self.runtime_factory = runtime_factory
        self.max_tokens = max_tokens
        self.runtime: ChatRuntime | None = None
        self.conversation: Conversation | None = None  # set with the runtime
        self.loaded: list[str] = []  # adapter names the runtime accepted
        self.replies: list[tuple[str, str]] = []  # (adapter label, reply text), for tests and the transcript
        self.generating = False
        self._streaming: Static | None = None  # the reply widget tokens are still arriving for
        self._chat_closing = False
        self._cancel = threading.Event()
        self._runtime_lock = threading.Lock()  # guards runtime close vs. use across worker threads

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Horizontal():
            with Vertical(id="adapter-pane"):
                yield Label("Adapter", id="adapter-title")
                with RadioSet(id="adapters"):
                    yield RadioButton(BASE_CHOICE, value=True, id="adapter-base")
                    for index, adapter in enumerate(self.adapters):
                        yield RadioButton(adapter.name, id=f"adapter-{index}", disabled=True)
            with Vertical(id="chat-pane"):
                yield VerticalScroll(id="transcript")
                yield Input(placeholder="loading model…", id="prompt", disabled=True)
        yield Footer()

    def on_mount(self) -> None:
        self.title = "edge-lora chat"
        self.sub_title = self.model_path.name
        self._load()

    # --- model + adapters, loaded once ---
    @work(thread=True, exclusive=True, group="chat-load")
    def _load(self) -> None:
        try:
            runtime = self.runtime_factory(self.model_path, self.n_ctx)
        except Exception as exc:
            self.app.call_from_thread(self._load_failed, f"could not load {self.model_path.name}: {_describe(exc)}", "red")
            return
        loaded: list[str] = []
        failures: list[str] = []
        for adapter in self.adapters:
            try:
                runtime.load_adapter(adapter.name, adapter.path, adapter.scale)
                loaded.append(adapter.name)
            except Exception as exc:
                failures.append(f"{adapter.name}: {_describe(exc)}")
        with self._runtime_lock:
            if self._chat_closing:
                runtime.close()
                return
            self.runtime = runtime
            self.conversation = Conversation(runtime, max_reply_tokens=self.max_tokens)
        self.app.call_from_thread(self._ready, loaded, failures)

    def _ready(self, loaded: list[str], failures: list[str]) -> None:
        self.loaded = loaded
        if not self.is_mounted:
            return
        for index, adapter in enumerate(self.adapters):
            self.query_one(f"#adapter-{index}", RadioButton).disabled = adapter.name not in loaded
        prompt = self.query_one("#prompt", Input)
        prompt.disabled = False
        prompt.placeholder = "message (enter to send)"
        prompt.focus()
        self._note(f"loaded {self.model_path.name} (ctx {self.n_ctx}); adapters: {', '.join(loaded) or 'none'}", "dim")
        for failure in failures:
            self._note(f"adapter not loaded — {failure}", "red")

    def _load_failed(self, message: str, style: str) -> None:
        if self.is_mounted:
            self.query_one("#prompt", Input).placeholder = "model not loaded — press escape"
            self._note(message, style)

    # --- conversation ---
    @property
    def selected_adapter(self) -> str | None:
        pressed = self.query_one("#adapters", RadioSet).pressed_button
        if pressed is None or pressed.id == "adapter-base":
            return None
        return self.adapters[int(str(pressed.id).removeprefix("adapter-"))].name

    @on(Input.Submitted, "#prompt")
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.runtime is None or self.generating:
            return
        event.input.value = ""
        self.send(text)

    def send(self, text: str) -> None:
        adapter = self.selected_adapter
        self.generating = True
        self._cancel = threading.Event()
        self._append(Text.assemble(("you: ", "bold"), text))
        reply = Static(Text(f"{adapter or 'base'}: ", style="bold green"), classes="reply")
        self.query_one("#transcript", VerticalScroll).mount(reply)
        self._streaming = reply
        self._generate(text, adapter, reply)

    @work(thread=True, exclusive=True, group="chat-generate")
    def _generate(self, message: str, adapter: str | None, reply: Static) -> None:
        label = adapter or "base"
        text = ""  # grows by one piece per token; each post carries it whole
        error: str | None = None
        with self._runtime_lock:
            conversation = self.conversation if self.runtime is not None else None
        try:
            if conversation is None:
                raise RuntimeError("the model is not loaded")
            # One runtime; the adapter set is chosen per request (scale None = its registered scale).
            # Once the context fills, the oldest exchanges leave the prompt (they stay on screen).
            for piece in conversation.send(message, adapters={adapter: None} if adapter else {},
                                           cancel=self._cancel):
                text += piece
                self.post_message(self.ReplyGrew(reply, label, text))
        except Exception as exc:
            error = _describe(exc)
        # Called, not posted: a closed screen drops its messages, and this closes the runtime then.
        self.app.call_from_thread(self._finish_reply, reply, label, text, error)

    @on(ReplyGrew)
    def _reply_grew(self, event: ReplyGrew) -> None:
        if event.reply is self._streaming:  # a token still queued behind the finished reply is dropped
            self._update_reply(event.reply, event.label, event.text)

    def _update_reply(self, reply: Static, label: str, text: str) -> None:
        if not self.is_mounted:  # the pane was closed while the reply streamed
            return
        reply.update(Text.assemble((f"{label}: ", "bold green"), text))
        self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)

    def _finish_reply(self, reply: Static, label: str, text: str, error: str | None) -> None:
        self.generating = False
        self._streaming = None
        if self._chat_closing:
            self._close_runtime()
            return
        if error is not None:  # the conversation left the failed turn out
            reply.update(Text.assemble((f"{label}: ", "bold red"), error))
        else:
            self.replies.append((label, text))
            self._update_reply(reply, label, text)

    def _append(self, text: Text) -> None:
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.mount(Static(text))
        transcript.scroll_end(animate=False)

    def _note(self, message: str, style: str) -> None:
        self._append(Text(message, style=style))

    def action_next_adapter(self) -> None:
        """Cycle base -> each loaded adapter -> base, without leaving the message box."""
        buttons = [b for b in self.query(RadioButton) if not b.disabled]
        current = next((i for i, b in enumerate(buttons) if b.value), 0)
        buttons[(current + 1) % len(buttons)].value = True

    def action_reset(self) -> None:
        if not self.generating:
            if self.conversation is not None:
                self.conversation.reset()
            self.query_one("#transcript", VerticalScroll).remove_children()
            self._note("new conversation", "dim")

    # --- teardown ---
    def on_unmount(self) -> None:
        self._chat_closing = True
        self._cancel.set()
        if not self.generating:
            self._close_runtime()

    def action_close_chat(self) -> None:
        self._chat_closing = True
        self._cancel.set()
        if not self.generating:
            self._close_runtime()
        self.app.pop_screen()

    def _close_runtime(self) -> None:
        with self._runtime_lock:
            runtime, self.runtime = self.runtime, None
        if runtime is not None:
            runtime.close()


def _describe(exc: BaseException) -> str:
    return exc.one_line() if isinstance(exc, EdgeLoraError) else f"{type(exc).__name__}: {exc}"
