"""The review's lower findings (issue 23): the adapter file opened once (a symlink swapped while a
load waits changes nothing), no llama.cpp log text in answers and no log lines shared between
threads, redaction of paths with spaces, the dependents set safe while threads add to it."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from edge_lora.core.gguf_check import FileIdentity
from edge_lora.serving import llama_backend
from edge_lora.serving.runtime import Runtime
from edge_lora.serving.server import _without_paths, make_app


@pytest.mark.parametrize("message,shown", [
    ("cannot open /Users/alice smith/models/a.gguf: No such file", "cannot open a.gguf: No such file"),
    ("bad C:\\Users\\alice smith\\x.gguf here", "bad x.gguf here"),
    ("file ~/my private dir/x.gguf.", "file x.gguf."),
    ('"/home/bob jones/q.gguf" is short', '"q.gguf" is short'),
    ("see /tmp/x and more", "see x and more"),
    ("plain text a/b stays", "plain text a/b stays"),
])
def test_paths_are_redacted_even_with_spaces(message: str, shown: str) -> None:
    assert _without_paths(message) == shown


def test_log_lines_stay_with_the_thread_that_caused_them() -> None:
    """Two requests failing at once must not read (or clear) each other's llama.cpp lines."""
    llama_backend._clear_log()
    llama_backend._thread_log().append("mine")
    seen: list[str] = []

    def other() -> None:
        llama_backend._thread_log().append("theirs")
        seen.append(llama_backend._last_log_lines())
    worker = threading.Thread(target=other)
    worker.start()
    worker.join()
    assert seen == ["theirs"]
    assert llama_backend._last_log_lines() == "mine"


class _Dependent:
    def close(self) -> None:
        pass


def test_dependents_can_be_listed_while_other_threads_add_to_them(gemma_q4_gguf: Path) -> None:
    """The WeakSet was iterated (adapter free, model close) while request threads registered
    grammar samplers: "set changed size during iteration". Hammered from 4 threads."""
    with llama_backend.LlamaModel(gemma_q4_gguf) as model:
        keep: list[_Dependent] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def add() -> None:
            while not stop.is_set():
                item = _Dependent()
                keep.append(item)
                model._register(item)  # type: ignore[arg-type]

        def walk() -> None:
            try:
                for _ in range(300):
                    model.dependents()
            except BaseException as exc:  # noqa: BLE001 - the finding is any exception
                errors.append(exc)
        adders = [threading.Thread(target=add) for _ in range(2)]
        walkers = [threading.Thread(target=walk) for _ in range(2)]
        for t in adders + walkers:
            t.start()
        for t in walkers:
            t.join()
        stop.set()
        for t in adders:
            t.join()
        assert not errors and len(model.dependents()) >= len(keep) > 0


def test_a_grammar_refused_by_the_engine_puts_no_engine_text_in_the_error(gemma_q4_gguf: Path) -> None:
    from edge_lora.core.errors import RequestError

    with llama_backend.LlamaModel(gemma_q4_gguf) as model:
        with pytest.raises(RequestError) as info:
            llama_backend.GrammarSampler(model, 'root ::= "a" secret-undefined-rule')
    assert "secret" not in info.value.one_line() and "details in the log" in info.value.one_line()


def test_a_symlink_swapped_while_the_load_waits_loads_the_checked_file(
        gemma_q4_gguf: Path, random_gemma_loras: tuple[Path, Path], tmp_path: Path) -> None:
    """The review's finding: the path was checked, then reopened by name after the wait for
    running generations, so a symlink swapped meanwhile loaded a file outside --adapter-dir.
    Now the descriptor opened at the check is what is validated and loaded."""
    adapter_dir, outside = tmp_path / "adapters", tmp_path / "outside"
    adapter_dir.mkdir()
    outside.mkdir()
    good, evil = adapter_dir / "good.gguf", outside / "evil.gguf"
    shutil.copy(random_gemma_loras[0], good)
    shutil.copy(random_gemma_loras[1], evil)
    link = adapter_dir / "x.gguf"
    link.symlink_to(good)
    rt = Runtime(gemma_q4_gguf, n_ctx=128, seed=0)  # one context
    try:
        app = make_app(rt, adapter_dir=adapter_dir)
        waiting = threading.Event()
        real_load = rt.load_adapter

        def spy(*args, **kwargs):
            waiting.set()  # called once the server has checked (and opened) the file
            return real_load(*args, **kwargs)
        rt.load_adapter = spy  # type: ignore[method-assign]
        holder = rt.generate("Hello", max_tokens=100, temperature=0)
        next(holder)  # the only context is taken: the load must wait for it

        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost:8000", timeout=120) as c:
                load = asyncio.create_task(c.post("/v1/load_lora_adapter",
                                                  json={"lora_name": "x", "lora_path": "x.gguf"}))
                assert await asyncio.to_thread(waiting.wait, 60)
                link.unlink()
                link.symlink_to(evil)  # swapped while the load waits
                await asyncio.sleep(0.2)
                holder.close()  # the context comes back; the load goes on
                return await load
        response = asyncio.run(go())
        assert response.status_code == 200, response.text
        loaded = rt.adapters["x"].adapter.info.identity
        assert loaded == FileIdentity.of(good.stat()) and loaded != FileIdentity.of(evil.stat())
        # A link that leads out is still refused at the check, without saying what is there.
        other = make_app(rt, adapter_dir=adapter_dir)

        async def refused() -> httpx.Response:
            transport = httpx.ASGITransport(app=other)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost:8000", timeout=120) as c:
                return await c.post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": "x.gguf"})
        assert asyncio.run(refused()).status_code == 403
    finally:
        rt.close()
