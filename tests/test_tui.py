"""Textual TUI: formats table and fit verdicts, context control, perplexity worker, chat with
hot-swapped adapters, modals, welcome screen, snapshots at 80x24 and 160x50."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from textual.widgets import Input, RadioButton, Select
from textual.worker import WorkerCancelled

from tests.support.tui_fakes import (GB, FakeRuntime, ScriptedFit, ScriptedPpl, fake_services, fixed_hardware,
                             write_fixture_dir)
from edge_lora.tui.app import make_app
from edge_lora.tui.screens.chat_screen import ChatScreen
from edge_lora.tui.screens.main_screen import MainScreen
from edge_lora.tui.widgets.formats_table import FormatsTable
from edge_lora.tui.view_model import human_bytes
from edge_lora.tui.widgets.size_kld_chart import SizeKldChart, bar


pytestmark = pytest.mark.anyio  # async tests run on anyio's pytest plugin (anyio ships with starlette/httpx)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_fixture_dir(tmp_path)


async def settle(pilot) -> None:  # type: ignore[no-untyped-def]
    """Let thread workers finish and their call_from_thread callbacks land. A cancelled worker
    is finished too: an exclusive worker replaced by a newer one (a re-fit), or one whose screen
    it dismissed (the welcome screen's) is cancelled by Textual, and wait_for_complete raises."""
    for _ in range(3):
        for worker in list(pilot.app.workers):
            with contextlib.suppress(WorkerCancelled):
                await worker.wait()
        await pilot.pause()


async def open_chat(pilot) -> ChatScreen:  # type: ignore[no-untyped-def]
    """From the main screen, open the chat pane ("t") and return it."""
    await settle(pilot)
    await pilot.press("t")
    await settle(pilot)
    chat = pilot.app.screen
    assert isinstance(chat, ChatScreen)
    return chat


def table_rows(app) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    table = app.screen.query_one(FormatsTable)
    rows = {}
    for row_key in table.rows:
        cells = table.row_text(Path(row_key.value))
        rows[cells[1]] = cells
    return rows


async def test_table_lists_every_format_with_verdicts_for_mocked_ram(model_dir: Path) -> None:
    app = make_app(model_dir, ctx=4096, refresh_seconds=0, **fake_services())
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        rows = table_rows(app)
        assert set(rows) == {"F16", "Q8_0", "Q4_K_M", "Q2_K"}  # the adapter file is not a format row
        # 1 GB available, 409.6 MB of KV at 4K: F16 949.6 MB is over 80% of free RAM -> tight.
        assert {k: r[5] for k, r in rows.items()} == {"F16": "tight", "Q8_0": "fits", "Q4_K_M": "fits", "Q2_K": "fits"}
        assert rows["F16"][0] == "★" and all(r[0] == "" for k, r in rows.items() if k != "F16")
        assert rows["Q4_K_M"][4] == "660 MB"  # 250 MB + 4096 * 100 kB
        assert rows["Q4_K_M"][3] == "4.89"
        table = app.screen.query_one(FormatsTable)
        assert table.ordered_columns[4].label.plain == "RAM@4K"


async def test_calibrated_formats_are_marked(model_dir: Path) -> None:
    """An ``imatrix`` column appears once a file was quantized with an importance matrix."""
    import json

    app = make_app(model_dir, ctx=4096, refresh_seconds=0, **fake_services())
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        assert all(len(r) == 8 for r in table_rows(app).values())  # no column when nothing is calibrated
    manifest = json.loads((model_dir / "manifest.json").read_text())
    for row in manifest["files"]:
        if row["format"] in ("Q4_K_M", "Q2_K"):
            row["imatrix"] = {"sha256": "1" * 64, "text_sha256": "2" * 64, "tokens": 13312,
                              "dataset": "gpl-3.0-lgpl-2.1.txt"}
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    app = make_app(model_dir, ctx=4096, refresh_seconds=0, **fake_services())
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        rows = table_rows(app)
        assert {k: r[8] for k, r in rows.items()} == {"F16": "", "Q8_0": "", "Q4_K_M": "✓", "Q2_K": "✓"}
        assert app.screen.query_one(FormatsTable).ordered_columns[8].label.plain == "imatrix"


async def test_changing_context_changes_verdicts(model_dir: Path) -> None:
    fit = ScriptedFit()
    app = make_app(model_dir, ctx=4096, refresh_seconds=0, **fake_services(fit_fn=fit))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        await pilot.press("plus")  # 4K -> 8K: 819.2 MB of KV
        await settle(pilot)
        assert app.screen.ctx == 8192
        assert app.screen.query_one("#ctx", Select).value == 8192
        rows = table_rows(app)
        assert {k: r[5] for k, r in rows.items()} == {"F16": "no", "Q8_0": "no", "Q4_K_M": "no", "Q2_K": "tight"}
        assert rows["Q2_K"][0] == "★"
        assert fit.calls[-1] == (8192, 1 * GB)
        await pilot.press("minus", "minus")  # 8K -> 2K
        await settle(pilot)
        assert {k: r[5] for k, r in table_rows(app).items()} == {
            "F16": "fits", "Q8_0": "fits", "Q4_K_M": "fits", "Q2_K": "fits"}


async def test_less_free_ram_turns_verdicts_red(model_dir: Path) -> None:
    app = make_app(model_dir, ctx=4096, refresh_seconds=0,
                   **fake_services(hardware_provider=lambda: fixed_hardware(available=680_000_000)))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        verdicts = {k: r[5] for k, r in table_rows(app).items()}
        assert verdicts == {"F16": "no", "Q8_0": "no", "Q4_K_M": "tight", "Q2_K": "tight"}


async def test_perplexity_selected_row_then_all(model_dir: Path) -> None:
    ppl = ScriptedPpl()
    recorded: list[tuple[Path, float, float | None]] = []
    app = make_app(model_dir, ctx=4096, refresh_seconds=0,
                   **fake_services(ppl_fn=ppl, record_quality=lambda d, m, r: recorded.append((m, r.ppl, r.kld))))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        table = app.screen.query_one(FormatsTable)
        table.move_cursor(row=table.get_row_index(str(model_dir / "tiny-model-Q4_K_M.gguf")))
        await pilot.press("p")
        await settle(pilot)
        rows = table_rows(app)
        assert rows["Q4_K_M"][6] == f"{9.0 + 8.0 / 4.89:.3f}"
        assert rows["Q4_K_M"][7] == f"{round(0.5 / 4.89, 4):.4f}"  # KLD against the F16 file
        assert rows["Q8_0"][6] == "–"
        assert ppl.calls == [(model_dir / "tiny-model-Q4_K_M.gguf", 512, model_dir / "tiny-model-F16.gguf")]
        assert recorded[0][0] == model_dir / "tiny-model-Q4_K_M.gguf"
        await pilot.press("P")
        await settle(pilot)
        rows = table_rows(app)
        assert all(r[6] != "–" for r in rows.values())
        assert rows["F16"][7] == "–"  # the baseline has no KLD against itself
        assert ppl.calls[1][0].name == "tiny-model-F16.gguf"  # baseline measured first
        assert "done for 4" in str(app.screen.query_one("#status").render())


async def test_perplexity_cancel_leaves_row_untouched(model_dir: Path) -> None:
    ppl = ScriptedPpl(steps=200, tick_seconds=0.02)
    app = make_app(model_dir, ctx=4096, refresh_seconds=0, **fake_services(ppl_fn=ppl))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        await pilot.press("p")
        for _ in range(100):
            if ppl.started.is_set():
                break
            await pilot.pause(0.05)
        assert ppl.started.is_set()
        assert app.screen.query_one("#task-row").display
        await pilot.press("escape")
        await settle(pilot)
        assert "cancelled" in str(app.screen.query_one("#status").render())
        assert not app.screen.query_one("#task-row").display
        assert all(r[6] == "–" for r in table_rows(app).values())


async def test_chat_switches_adapters_on_one_runtime(model_dir: Path) -> None:
    FakeRuntime.instances.clear()
    app = make_app(model_dir, ctx=2048, refresh_seconds=0, **fake_services())
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await open_chat(pilot)
        assert len(FakeRuntime.instances) == 1
        runtime = FakeRuntime.instances[0]
        assert runtime.n_ctx == 2048
        assert runtime.loaded == {"legal": model_dir / "adapter-legal.gguf"}
        chat.query_one("#prompt", Input).value = "hello"
        await pilot.press("enter")
        await settle(pilot)
        chat.query_one("#adapter-0", RadioButton).value = True  # pick "legal"
        await pilot.pause()
        chat.query_one("#prompt", Input).value = "hello"
        await pilot.press("enter")
        await settle(pilot)
        assert chat.replies == [("base", "[base] echo hello"), ("legal", "[legal] echo hello")]
        assert runtime.requests == [{}, {"legal": None}]
        assert len(FakeRuntime.instances) == 1  # switched per message, never reloaded
        # one conversation across the adapter switch: the second prompt carries the first exchange
        first = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "[base] echo hello"}]
        assert runtime.prompts == [first[:1], first + first[:1]]
        assert runtime.max_tokens == [chat.max_tokens] * 2
        assert chat.conversation is not None
        assert chat.conversation.messages == first + [first[0], {"role": "assistant", "content": "[legal] echo hello"}]
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, MainScreen)
        assert runtime.closed


def record_hops(app, monkeypatch: pytest.MonkeyPatch) -> list[str]:  # type: ignore[no-untyped-def]
    """Names of the callbacks worker threads hand to app.call_from_thread (each blocks the worker)."""
    hops: list[str] = []
    real = app.call_from_thread

    def counting(callback, *args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(getattr(callback, "__name__", repr(callback)))
        return real(callback, *args, **kwargs)

    monkeypatch.setattr(app, "call_from_thread", counting)
    return hops


class LongReplyRuntime(FakeRuntime):
    def generate(self, prompt: object, adapters: object = None, max_tokens: int = 128, **kwargs: object):  # type: ignore[no-untyped-def, override]
        yield from [f"t{i} " for i in range(300)]


async def test_chat_streams_tokens_without_blocking_the_generator(model_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(model_dir, refresh_seconds=0, **fake_services(runtime_factory=LongReplyRuntime))
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await open_chat(pilot)
        hops = record_hops(app, monkeypatch)
        chat.query_one("#prompt", Input).value = "hello"
        await pilot.press("enter")
        await settle(pilot)
        expected = "".join(f"t{i} " for i in range(300))
        assert chat.replies == [("base", expected)]
        assert hops == ["_finish_reply"]  # tokens are posted; only the end waits for the UI
        assert str(chat.query(".reply").last().render()) == f"base: {expected}"


async def test_progress_ticks_do_not_block_the_worker(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ppl = ScriptedPpl(steps=500)
    app = make_app(model_dir, refresh_seconds=0, **fake_services(ppl_fn=ppl))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        hops = record_hops(app, monkeypatch)
        await pilot.press("p")
        await settle(pilot)
        assert hops == ["_apply_quality", "_end_task"]
        assert "done for 1" in str(app.screen.query_one("#status").render())


def test_progress_is_throttled_but_cancel_is_checked_every_tick() -> None:
    import threading

    from edge_lora.tui.progress_bridge import OperationCancelled, ThreadProgress

    reports: list[tuple[str, float | None, float]] = []
    cancel = threading.Event()
    sink = ThreadProgress(lambda *report: reports.append(report), cancel, "q: ", min_interval=3600)
    sink.start("tensors", 1000)
    for _ in range(998):
        sink.advance()
    sink.advance(description="Q4_K_M")  # a new step always shows
    sink.finish()
    assert reports == [("q: tensors", 1000, 0.0), ("q: Q4_K_M", 1000, 999.0), ("q: Q4_K_M", 1000, 1000)]
    cancel.set()
    with pytest.raises(OperationCancelled):
        sink.advance()


async def test_register_adapter_modal(model_dir: Path) -> None:
    services = fake_services()
    app = make_app(model_dir, refresh_seconds=0, **services)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("a")
        await pilot.pause()
        app.screen.query_one("#adapter-name", Input).value = "mine"
        app.screen.query_one("#adapter-path", Input).value = str(model_dir / "adapter-legal.gguf")
        app.screen.query_one("#adapter-scale", Input).value = "abc"
        await pilot.click("#adapter-ok")
        await pilot.pause()
        assert "not a number" in str(app.screen.query_one("#adapter-dialog-error").render())
        app.screen.query_one("#adapter-scale", Input).value = "0.5"
        app.screen.query_one("#adapter-scale", Input).focus()
        await pilot.press("enter")  # enter in any field submits too
        await settle(pilot)
        assert isinstance(app.screen, MainScreen)
        assert [(a.name, a.scale) for a in services["list_adapters"]()] == [("mine", 0.5)]


async def test_convert_modal_runs_convert_and_opens_result(model_dir: Path, tmp_path: Path) -> None:
    calls: list[tuple[str, Path, str | None, tuple[str, ...]]] = []

    def convert(base, out_dir, adapter, quants, progress):  # type: ignore[no-untyped-def]
        calls.append((base, out_dir, adapter, tuple(quants)))
        progress.start("tensors F16", 3)
        for _ in range(3):
            progress.advance(1)
        return write_fixture_dir(out_dir.parent, out_dir.name)

    app = make_app(model_dir, refresh_seconds=0, **fake_services(convert_fn=convert))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("n")
        await pilot.pause()
        app.screen.query_one("#base", Input).value = "/models/base"
        app.screen.query_one("#quants", Input).value = "q4_k_m, Q8_0"
        app.screen.query_one("#out", Input).value = str(tmp_path / "new-model")
        await pilot.click("#ok")
        await settle(pilot)
        assert calls == [("/models/base", tmp_path / "new-model", None, ("Q4_K_M", "Q8_0"))]
        assert app.screen.view.name == "new-model"
        assert set(table_rows(app)) == {"F16", "Q8_0", "Q4_K_M", "Q2_K"}


async def test_modelfile_action_reports_written_file(model_dir: Path) -> None:
    written: list[tuple[Path, int, Path]] = []

    def write(model: Path, num_ctx: int, out_dir: Path) -> Path:
        written.append((model, num_ctx, out_dir))
        return out_dir / "Modelfile"

    app = make_app(model_dir, ctx=4096, refresh_seconds=0, **fake_services(write_modelfile=write))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("m")
        await pilot.pause()
        assert written == [(model_dir / "tiny-model-F16.gguf", 4096, model_dir)]  # the recommended row
        assert "ollama create" in str(app.screen.query_one("#status").render())


async def test_welcome_screen_opens_demo(model_dir: Path) -> None:
    app = make_app(None, refresh_seconds=0, **fake_services(demo_model=lambda: model_dir))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert "edge-lora demo" in app.screen.query_one("Markdown").source  # type: ignore[attr-defined]
        await pilot.press("d")
        await settle(pilot)
        assert isinstance(app.screen, MainScreen)
        assert set(table_rows(app)) == {"F16", "Q8_0", "Q4_K_M", "Q2_K"}


async def test_resize_between_80x24_and_160x50(model_dir: Path) -> None:
    app = make_app(model_dir, refresh_seconds=0, **fake_services())
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        table = app.screen.query_one(FormatsTable)
        assert table.region.height >= 5 and table.region.right <= 80
        await pilot.resize_terminal(160, 50)
        await pilot.pause()
        assert app.screen.query_one(SizeKldChart).region.width > 150
        assert table.region.height > 5
        await pilot.resize_terminal(80, 24)
        await pilot.pause()
        assert app.screen.query_one("Footer").region.bottom == 24


def test_bar_uses_eighth_blocks() -> None:
    assert bar(1.0, 4) == "████"
    assert bar(0.0, 4) == "    "
    assert bar(0.5 + 1 / 32, 4) == "██▏ "
    assert bar(2.0, 3) == "███"  # clamped


def test_bad_directory_is_a_typed_error(tmp_path: Path) -> None:
    from edge_lora.core.errors import InputError, InputNotFoundError

    with pytest.raises(InputNotFoundError):
        make_app(tmp_path / "missing", **fake_services())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text('{"files": [{"path": "../../etc/passwd", "format": "F16", "kind": "model", "bytes": 1, "bpw": 16.0, "sha256": ""}]}')
    with pytest.raises(InputError, match="outside"):
        make_app(tmp_path / "bad", **fake_services())


def test_quality_recorded_for_a_symlinked_format_by_tui_and_cli(tmp_path: Path, gemma_q4_gguf: Path) -> None:
    # write_gemma_dir symlinks each format: resolving the path would leave the directory.
    from edge_lora.core.manifest import Manifest
    from edge_lora.cli.ppl import _record_in_manifest
    from edge_lora.tui.real_services import record_quality
    from edge_lora.tui.view_model import QualityResult
    from tests.support.tui_fakes import write_gemma_dir

    directory = write_gemma_dir(tmp_path, {"Q4_K_M": gemma_q4_gguf})
    model = directory / "gemma-3-270m-Q4_K_M.gguf"
    record_quality(directory, model, QualityResult(ppl=12.5, kld=0.25))
    assert (Manifest.load(directory).files[0].ppl, Manifest.load(directory).files[0].kld) == (12.5, 0.25)
    assert _record_in_manifest(model.absolute(), 11.0, None)
    assert Manifest.load(directory).files[0].ppl == 11.0
    record_quality(tmp_path, gemma_q4_gguf, QualityResult(ppl=1.0, kld=None))  # no manifest: nothing to do
    assert not (tmp_path / "manifest.json").exists()


def _tiny_gemma(path: Path, n_layer: int) -> Path:
    """A model GGUF with just the metadata the fit estimator reads, published atomically as convert does."""
    import gguf
    import numpy as np

    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), "gemma3")
    for add, value in ((writer.add_context_length, 8192), (writer.add_block_count, n_layer),
                       (writer.add_head_count, 1), (writer.add_embedding_length, 32)):
        add(value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)
    return path


def test_real_refit_parses_headers_once_per_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The screen re-fits on every context / free-RAM change; a real header costs ~30 ms to parse.
    from tests.support.gguf_parses import count_parses
    from edge_lora.tui.real_services import fit_predictions

    paths = [_tiny_gemma(tmp_path / "m-F16.gguf", 2), _tiny_gemma(tmp_path / "m-Q8_0.gguf", 2)]
    parsed = count_parses(monkeypatch)
    small = fit_predictions(paths, 512, 8 * GB)
    big = fit_predictions(paths, 8192, 8 * GB)
    assert sorted(parsed) == paths and [p.path for p in big] == paths
    assert all(b.total_bytes > s.total_bytes for b, s in zip(big, small))
    _tiny_gemma(paths[0], 4)  # a re-convert replaces the file: its header is read again
    again = fit_predictions(paths, 8192, 8 * GB)
    assert len(parsed) == 4 and again[0].total_bytes > big[0].total_bytes


def test_unknown_service_name_is_refused() -> None:
    with pytest.raises(TypeError, match="fit_function"):
        make_app(None, fit_function=lambda *a: [])


# --- snapshots (deterministic: fixed RAM, fixture dir, no clock) ---

def _snapshot_app(tmp_path: Path):  # type: ignore[no-untyped-def]
    return make_app(write_fixture_dir(tmp_path), ctx=4096, refresh_seconds=0, **fake_services())


async def _settle_for_snapshot(pilot) -> None:  # type: ignore[no-untyped-def]
    await settle(pilot)


def test_snapshot_main_80x24(snap_compare, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(_snapshot_app(tmp_path), terminal_size=(80, 24), run_before=_settle_for_snapshot)


def test_snapshot_main_160x50(snap_compare, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(_snapshot_app(tmp_path), terminal_size=(160, 50), run_before=_settle_for_snapshot)


# --- real library on the real Gemma 3 270M files ---

@pytest.fixture
def gemma_dir(tmp_path: Path, gemma_q4_gguf: Path, gemma_f16_gguf: Path) -> Path:
    from tests.support.tui_fakes import write_gemma_dir

    return write_gemma_dir(tmp_path, {"F16": gemma_f16_gguf, "Q4_K_M": gemma_q4_gguf})


@pytest.mark.slow  # the F16 fixture is a real conversion the first time
async def test_real_fit_estimator_on_gemma_files(gemma_dir: Path) -> None:
    from edge_lora.analysis.fit import estimate_memory

    q4, f16 = gemma_dir / "gemma-3-270m-Q4_K_M.gguf", gemma_dir / "gemma-3-270m-F16.gguf"
    q4_total = estimate_memory(q4, 2048).total_bytes
    f16_total = estimate_memory(f16, 2048).total_bytes
    assert f16_total > q4_total
    # Free RAM between the two predictions: Q4_K_M runs comfortably, F16 does not run at all.
    available = max(int(q4_total / 0.8) + 1, (q4_total + f16_total) // 2)
    assert available < f16_total
    app = make_app(gemma_dir, ctx=2048, refresh_seconds=0,
                   hardware_provider=lambda: fixed_hardware(available=available))  # real fit_fn
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        rows = table_rows(app)
        assert rows["Q4_K_M"][4:6] == [human_bytes(q4_total), "fits"]
        assert rows["F16"][4:6] == [human_bytes(f16_total), "no"]
        assert rows["Q4_K_M"][0] == "★" and rows["F16"][0] == ""
        # Gemma's 262K x 640 embedding falls back to 8-bit types, so its "Q4_K_M" averages well above 4.9 bpw.
        assert 4.5 < float(rows["Q4_K_M"][3]) < 8.5 < float(rows["F16"][3])
        await pilot.press("plus", "plus", "plus")  # 2K -> 16K
        await settle(pilot)
        q4_16k = estimate_memory(q4, 16384).total_bytes
        assert q4_16k > q4_total
        assert table_rows(app)["Q4_K_M"][4] == human_bytes(q4_16k)


@pytest.mark.slow
async def test_real_perplexity_updates_row_and_manifest(tmp_path: Path, gemma_q4_gguf: Path) -> None:
    from edge_lora.core.manifest import Manifest
    from tests.support.tui_fakes import write_gemma_dir

    directory = write_gemma_dir(tmp_path, {"Q4_K_M": gemma_q4_gguf})
    text = Path("/usr/share/common-licenses/Apache-2.0").read_text()[:900]  # ~200 tokens: 2 windows of 64
    app = make_app(directory, ctx=2048, ppl_ctx=64, refresh_seconds=0,
                   hardware_provider=lambda: fixed_hardware(available=8 * GB), eval_text=lambda: text)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        await pilot.press("p")
        for _ in range(1200):
            if app.screen.busy is None:
                break
            await pilot.pause(0.1)
        await settle(pilot)
        status = str(app.screen.query_one("#status").render())
        assert "done for 1" in status, status
        q4_ppl = float(table_rows(app)["Q4_K_M"][6])
        assert 1.0 < q4_ppl < 200.0  # licence prose at a 64-token context: a few tens
        recorded = {f.format: f for f in Manifest.load(directory).files}
        assert recorded["Q4_K_M"].ppl == pytest.approx(q4_ppl, abs=1e-3)


@pytest.mark.slow
async def test_real_runtime_chat_switches_adapter(tmp_path: Path, gemma_q4_gguf: Path,
                                                  random_gemma_loras: tuple[Path, Path]) -> None:
    from tests.support.tui_fakes import write_gemma_dir

    directory = write_gemma_dir(tmp_path, {"Q4_K_M": gemma_q4_gguf}, {"rand": random_gemma_loras[0]})
    app = make_app(directory, ctx=512, refresh_seconds=0, chat_max_tokens=12,
                   hardware_provider=lambda: fixed_hardware(available=8 * GB))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        await pilot.press("t")
        chat = app.screen
        for _ in range(300):
            await settle(pilot)
            if chat.runtime is not None and not chat.query_one("#prompt", Input).disabled:
                break
        assert chat.loaded == ["rand"]
        runtime = chat.runtime
        for _ in range(2):
            chat.query_one("#prompt", Input).value = "The license grants you"
            await pilot.press("enter")
            for _ in range(300):
                await settle(pilot)
                if not chat.generating:
                    break
            await pilot.press("ctrl+t")  # next adapter: base -> rand
        assert [label for label, _ in chat.replies] == ["base", "rand"]
        base_reply, adapter_reply = (text for _, text in chat.replies)
        assert base_reply.strip() and adapter_reply.strip()
        assert base_reply != adapter_reply
        assert chat.runtime is runtime  # one runtime: the adapter was applied per message
        await pilot.press("escape")
        await settle(pilot)


async def test_welcome_opens_the_real_demo_model() -> None:
    app = make_app(None, refresh_seconds=0, hardware_provider=lambda: fixed_hardware(available=8 * GB))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("d")
        for _ in range(100):
            await settle(pilot)
            if isinstance(app.screen, MainScreen) and app.screen.predictions:
                break
        rows = table_rows(app)
        assert list(rows) == ["Q4_K_M"]  # read from the GGUF's file type, not its name
        assert rows["Q4_K_M"][0] == "★" and rows["Q4_K_M"][5] == "fits"


async def test_real_convert_from_modal_then_modelfile(tmp_path: Path) -> None:
    from tests.support.model_fixtures import make_checkpoint

    checkpoint = make_checkpoint("llama", tmp_path / "ckpt")
    start = write_fixture_dir(tmp_path / "start")
    # Real services throughout; the start dir's placeholder files are not GGUF, so the real fit refuses them.
    app = make_app(start, refresh_seconds=0, hardware_provider=lambda: fixed_hardware(available=8 * GB))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert "fit: " in str(app.screen.query_one("#status").render())  # a typed error shown, no crash
        await pilot.press("n")
        await pilot.pause()
        app.screen.query_one("#base", Input).value = str(checkpoint)
        app.screen.query_one("#quants", Input).value = "Q8_0"
        app.screen.query_one("#out", Input).value = str(tmp_path / "out")
        app.screen.query_one("#out", Input).focus()
        await pilot.press("enter")
        for _ in range(600):
            await settle(pilot)
            if isinstance(app.screen, MainScreen) and app.screen.busy is None:
                break
        status = str(app.screen.query_one("#status").render())
        assert "converted" in status, status
        rows = table_rows(app)
        assert set(rows) == {"F16", "Q8_0"}
        assert all(r[5] == "fits" for r in rows.values())  # a tiny model, 8 GB free
        await pilot.press("m")
        await pilot.pause()
        modelfile = tmp_path / "out" / "Modelfile"
        assert modelfile.is_file()
        assert "FROM" in modelfile.read_text()
        assert str(modelfile) in str(app.screen.query_one("#status").render())


async def test_hardware_panel_refreshes_and_refits_when_free_ram_moves(model_dir: Path) -> None:
    readings = iter([1 * GB] * 3 + [680_000_000] * 1000)  # free RAM drops after a few readings
    fit = ScriptedFit()
    app = make_app(model_dir, ctx=4096, refresh_seconds=0.05,
                   **fake_services(fit_fn=fit, hardware_provider=lambda: fixed_hardware(available=next(readings))))
    async with app.run_test(size=(100, 30)) as pilot:
        for _ in range(100):
            await pilot.pause(0.05)
            if fit.calls and fit.calls[-1][1] == 680_000_000:
                break
        await settle(pilot)
        assert [available for _, available in fit.calls] == [1 * GB, 680_000_000]  # only on a real change
        assert "680 MB free" in str(app.screen.query_one("#hardware").render())
        assert table_rows(app)["Q8_0"][5] == "no"


async def test_combine_adapters_modal(model_dir: Path) -> None:
    """The adapter dialog's Combine button: weights parsed, errors shown in the dialog, the result
    registered."""
    from edge_lora.tui.screens.combine_modal import CombineModal

    services = fake_services()
    services["register_adapter"]("legal", model_dir / "adapter-legal.gguf", 1.0)
    services["register_adapter"]("tone", model_dir / "adapter-legal.gguf", 1.0)
    app = make_app(model_dir, refresh_seconds=0, **services)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        await pilot.press("a")
        await pilot.pause()
        await pilot.click("#adapter-combine")
        await pilot.pause()
        assert isinstance(app.screen, CombineModal)
        assert "legal, tone" in str(app.screen.query_one("#combine-registered").render())
        app.screen.query_one("#combine-inputs", Input).value = "legal:0.5 nope:1"
        app.screen.query_one("#combine-name", Input).value = "mix"
        await pilot.click("#combine-ok")
        app.screen.query_one("#combine-name", Input).focus()
        await pilot.press("enter")
        await pilot.pause()
        assert "neither a registered adapter" in str(app.screen.query_one("#adapter-dialog-error").render())
        app.screen.query_one("#combine-inputs", Input).value = "legal:0.5, tone:-x"
        app.screen.query_one("#combine-name", Input).focus()
        await pilot.press("enter")
        await pilot.pause()
        assert "not a number" in str(app.screen.query_one("#adapter-dialog-error").render())
        app.screen.query_one("#combine-inputs", Input).value = "legal:0.5 tone:-1"
        app.screen.query_one("#combine-method", Input).value = "ties"
        app.screen.query_one("#combine-density", Input).value = "0.4"
        app.screen.query_one("#combine-name", Input).focus()
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, MainScreen)
        assert services["combine_adapters"].calls == [("mix", (("legal", 0.5), ("tone", -1.0)), "ties", 0.4)]
        assert "mix" in [a.name for a in services["list_adapters"]()]
