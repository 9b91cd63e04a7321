"""decode.py --chat reads piped input line by line and ends at EOF (no terminal needed); at a terminal an
empty line ends it. The decoder is stubbed: only the loop's reading of stdin and its turns are tested."""

from __future__ import annotations

import io
import types

from clp_jax.cli import report


class _Pipe(io.StringIO):
    def isatty(self):
        return False


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _stubbed(monkeypatch):
    """The turns the loop sends (the whole chat so far, each time) and a decoder that answers 'ok N'."""
    sent = []

    def stream_one(decoder, tok, ids, seed=0):
        print(f"ok {len(sent)}")
        return types.SimpleNamespace(tokens=[[len(sent)]])

    def encode(tok, messages, chat):
        sent.append([dict(m) for m in messages])
        return [1, 2, 3]

    monkeypatch.setattr(report, "stream_one", stream_one)
    monkeypatch.setattr(report, "encode", encode)
    monkeypatch.setattr(report, "stats_line", lambda *a, **k: "[stats]")
    decoder = types.SimpleNamespace(check_prompts=lambda ids: None, dc=types.SimpleNamespace(mode="verify"))
    tok = types.SimpleNamespace(decode=lambda t, skip_special_tokens=True: f"ok {t[0]}")
    return sent, decoder, tok


def test_piped_chat_reads_every_line_and_ends_at_eof(monkeypatch, capsys):
    sent, decoder, tok = _stubbed(monkeypatch)
    assert report.chat_loop(decoder, tok, stdin=_Pipe("def add(a, b):\n\n  second turn  \n")) == 0
    assert [[m["content"] for m in turn] for turn in sent] == [
        ["def add(a, b):"], ["def add(a, b):", "ok 1", "second turn"]]  # a blank line is skipped, not the end
    out = capsys.readouterr().out
    assert "you> def add(a, b):" in out and "you> second turn" in out  # echoed: the transcript reads in order
    assert out.rstrip().endswith("ok 2")  # no prompt left waiting after EOF


def test_piped_chat_without_a_final_newline_and_quit(monkeypatch):
    sent, decoder, tok = _stubbed(monkeypatch)
    assert report.chat_loop(decoder, tok, stdin=_Pipe("one\nquit\nnever")) == 0
    assert len(sent) == 1
    sent.clear()
    assert report.chat_loop(decoder, tok, stdin=_Pipe("last line, no newline")) == 0
    assert len(sent) == 1


def test_terminal_chat_ends_at_an_empty_line(monkeypatch):
    sent, decoder, tok = _stubbed(monkeypatch)
    lines = iter(["hello", "", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert report.chat_loop(decoder, tok, stdin=_Tty()) == 0
    assert len(sent) == 1
