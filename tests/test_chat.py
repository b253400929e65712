"""`aura chat` driven through a pseudo-terminal, as a person would use it."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import pytest

from conftest import requires_extra
from serving import env, tiny_run

pexpect = requires_extra("pexpect", "dev")

SNN_RAG = ("model.name=snn_rag", "model.memory_capacity=64", "model.memory_chunk=8")


def live_ctrl_c() -> None:
    """Ctrl-C as a person at a terminal has it: a test run launched in the background (``&``
    without job control) ignores SIGINT, the chat would inherit that, and Python then installs
    no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(run: Path, *args: str, cwd: Path) -> object:
    child = pexpect.spawn(sys.executable, ["-m", "aura", "chat", str(run), *args], env=env(),
                          cwd=str(cwd), timeout=60, encoding="utf-8", codec_errors="replace",
                          preexec_fn=live_ctrl_c)
    child.expect_exact("/help for commands")
    return child


@pytest.mark.slow
def test_a_conversation_commands_and_ctrl_c_that_stops_only_the_reply(tmp_path: Path) -> None:
    child = spawn(tiny_run(tmp_path), "--seed", "1", "--max-new-tokens", "1000000",
                  cwd=tmp_path)
    child.expect_exact("you> ")
    child.sendline("Tell me a very long story")
    child.expect_exact("aura> ")
    child.expect(r".")  # the reply is streaming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact("you> ")  # still in the REPL
    child.sendline("/set temperature 0.5")
    child.expect_exact("temperature = 0.5")
    child.sendline("/set max_new_tokens 5")
    child.expect_exact("max_new_tokens = 5")
    child.sendline("/set temperature hot")
    child.expect_exact("cannot set temperature")
    child.sendline("and then?")
    child.expect_exact("you> ")
    child.sendline("/save talk.json")
    child.expect_exact("saved 4 messages to talk.json")
    child.sendline("/memory")
    child.expect_exact("start with --memory-dir DIR")
    child.sendline("/reset")
    child.expect_exact("conversation cleared")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    messages = json.loads((tmp_path / "talk.json").read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "Tell me a very long story"
    assert messages[1]["content"]  # what was written before Ctrl-C is kept


@pytest.mark.slow
def test_chat_memory_persists_across_sessions(tmp_path: Path) -> None:
    run, memory = tiny_run(tmp_path, *SNN_RAG), tmp_path / "memory"
    child = spawn(run, "--seed", "1", "--max-new-tokens", "6", "--memory-dir", str(memory),
                  cwd=tmp_path)
    child.expect_exact("0 from conversations")
    child.expect_exact("you> ")
    child.sendline("my name is Zed and I like green apples")
    child.expect_exact("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    again = spawn(run, "--seed", "1", "--max-new-tokens", "6", "--memory-dir", str(memory),
                  cwd=tmp_path)
    again.expect_exact("4 from conversations")
    again.sendline("what is my name? I like green apples")
    again.expect_exact("you> ")
    again.sendline("/memory")
    again.expect_exact("Zed")
    again.sendline("/quit")
    again.expect(pexpect.EOF)


def test_the_repl_in_process(tmp_path: Path) -> None:
    """The same commands without a terminal (piped input), fast enough for the default suite."""
    import io

    from aura.infer.chat import ChatOptions, run_chat
    from aura.infer.sampling import SamplingConfig
    from aura.train.checkpoint import load_for_inference

    loaded = load_for_inference(tiny_run(tmp_path))
    out = io.StringIO()
    typed = "hi\n/set top_k 5\n/set nope 1\n/memory\nand?\n/save {}\n/bogus\n".format(
        tmp_path / "c.json")
    options = ChatOptions(SamplingConfig(seed=3), max_new_tokens=4, system="Be kind.")
    run_chat(loaded.model, loaded.tokenizer, options, io.StringIO(typed), out)
    text = out.getvalue()
    assert "top_k = 5" in text and "usage: /set NAME VALUE" in text
    assert "start with --memory-dir DIR" in text and "unknown command /bogus" in text
    assert "saved 5 messages" in text and text.count("aura> ") == 2
    roles = [m["role"] for m in json.loads((tmp_path / "c.json").read_text())["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]


def test_a_line_that_is_not_utf8_is_refused_once_and_the_chat_goes_on() -> None:
    import io

    from aura.infer.chat import _read

    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe bad\nhello\n"), encoding="utf-8")
    out = io.StringIO()
    with pytest.raises(UnicodeDecodeError):
        _read(stdin, out)
    assert _read(stdin, out) == "hello"
    with pytest.raises(EOFError):
        _read(stdin, out)


def test_load_continues_a_saved_conversation_and_refuses_bad_files(tmp_path: Path) -> None:
    import io

    from aura.infer.chat import ChatOptions, load_conversation, run_chat
    from aura.infer.sampling import SamplingConfig
    from aura.train.checkpoint import load_for_inference

    loaded = load_for_inference(tiny_run(tmp_path))
    saved, again = tmp_path / "a.json", tmp_path / "b.json"
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "role.json").write_text('[{"role": "robot", "content": "x"}]')

    def chat(typed: str, **kw: object) -> str:
        out = io.StringIO()
        run_chat(loaded.model, loaded.tokenizer,
                 ChatOptions(SamplingConfig(seed=3), max_new_tokens=3, **kw),
                 io.StringIO(typed), out)
        return out.getvalue()

    chat(f"remember the word tulip\n/save {saved}\n")
    text = chat(f"/load {tmp_path / 'nope.json'}\n/load {tmp_path / 'bad.json'}\n"
                f"/load {tmp_path / 'role.json'}\n/load\n/load {saved}\nand?\n/save {again}\n")
    assert "cannot read" in text and "not a JSON conversation" in text
    assert "message 0 needs a role" in text and "usage: /load FILE" in text
    assert "loaded 2 messages" in text and "saved 4 messages" in text
    first, second = load_conversation(saved)[0], load_conversation(again)[0]
    assert second[:2] == first and first[0] == ("user", "remember the word tulip")
    assert second[2] == ("user", "and?")
    text = chat(f"/save {again}\n", load=saved)  # --load: the same at the start
    assert f"continuing 2 messages from {saved}" in text and "saved 2 messages" in text
    openai_style = tmp_path / "o.json"
    openai_style.write_text(json.dumps({"messages": [{"role": "developer", "content": "Hi"}]}))
    assert load_conversation(openai_style) == ([("system", "Hi")], None)


def test_memory_modes_write_read_and_off(tmp_path: Path) -> None:
    """write remembers each exchange (kept in --memory-dir), read restores and reads it but
    adds nothing (--show-memory prints what a reply retrieved), off reads none."""
    import io

    from aura.infer.chat import ChatOptions, run_chat
    from aura.infer.sampling import SamplingConfig
    from aura.train.checkpoint import load_for_inference

    loaded = load_for_inference(tiny_run(tmp_path, *SNN_RAG))
    memory = tmp_path / "memory"

    def chat(typed: str, mode: str, memory_dir: Path | None, show: bool = False) -> str:
        out = io.StringIO()
        run_chat(loaded.model, loaded.tokenizer,
                 ChatOptions(SamplingConfig(seed=3), max_new_tokens=3, memory_dir=memory_dir,
                             memory_mode=mode, show_memory=show), io.StringIO(typed), out)
        return out.getvalue()

    def remembered(text: str) -> list[int]:
        return [int(n) for n in re.findall(r"(\d+) from conversations", text)]

    assert remembered(chat("my name is Zed\n/memory\n", "write", None))[-1] > 0
    assert not memory.exists()  # written for the session only
    chat("my name is Zed\n", "write", memory)
    saved = {p: p.read_bytes() for p in memory.rglob("*") if p.is_file()}
    assert saved
    text = chat("what is my name?\n/memory\n", "read", memory)
    assert "Zed" in text  # restored and retrieved
    assert remembered(text)[0] == remembered(text)[-1] > 0  # nothing added
    assert "Zed" in chat("what is my name?\n", "read", memory, show=True)  # --show-memory
    assert {p: p.read_bytes() for p in memory.rglob("*") if p.is_file()} == saved
    assert "no episodic memory in use" in chat("hi\n/memory\n", "off", None)


def test_serve_decodes_with_its_memory_mode(tmp_path: Path) -> None:
    from aura.infer.engine import Engine
    from aura.infer.server import ServeOptions, Service
    from aura.train.checkpoint import load_for_inference

    loaded = load_for_inference(tiny_run(tmp_path, *SNN_RAG))
    for mode, kwargs in (("off", {"use_memory": False}), ("read", {}), ("write", {})):
        service = Service(loaded.model, loaded.tokenizer,
                          ServeOptions(memory_mode=mode, engine="thread"))
        try:
            engine = service.engine
            assert isinstance(engine, Engine)
            assert engine.worker.memory == kwargs
            assert (engine.memory is not None) == (mode == "write") == service.writes
        finally:
            service.close()
