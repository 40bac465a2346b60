from proposers.detok import TextStream


class ByteTokenizer:
    """Token i is byte i: lets tests split multi-byte characters across tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def ids(s: str) -> list[int]:
    return list(s.encode())


def test_multibyte_characters_are_never_cut():
    euro = ids("a€b")  # € is 3 bytes
    ts = TextStream(ByteTokenizer())
    out = [ts.push([t]).text for t in euro]
    assert out == ["a", "", "", "€", "b"][:len(euro)] or "".join(out) == "a€b"
    assert all("\ufffd" not in o for o in out)
    assert "".join(out) + ts.flush() == "a€b"


def test_stop_string_trims_text_and_tokens():
    ts = TextStream(ByteTokenizer(), stop=["END"])
    p = ts.push(ids("hello EN"))
    assert p.text == "hello " and not p.stopped  # "EN" held back: may start "END"
    p = ts.push(ids("Dxyz"))
    assert p.stopped and p.num_tokens == 1 and p.text == ""
    assert ts.text == "hello "


def test_held_back_prefix_is_released_when_it_diverges():
    ts = TextStream(ByteTokenizer(), stop=["END"])
    assert ts.push(ids("xE")).text == "x"
    assert ts.push(ids("Z")).text == "EZ"


def test_stop_inside_one_multi_token_step():
    ts = TextStream(ByteTokenizer(), stop=["\n\n"])
    p = ts.push(ids("ab\n\ncd"))
    assert p.stopped and p.text == "ab" and p.num_tokens == 4


def test_eos_token_ids_from_every_source():
    import types

    from proposers.detok import eos_token_ids

    assert eos_token_ids(types.SimpleNamespace(eos_token_id=[2, 7]), None,
                         types.SimpleNamespace(eos_token_id=5),
                         types.SimpleNamespace(eos_token_id=None)) == {2, 5, 7}


def test_incremental_decoding_equals_a_full_decode_with_the_real_tokenizer(base_model_path):
    """Windowed decoding releases exactly the text a decode of all tokens gives, step by
    step, on SmolLM2's byte-level BPE: random steps of 1-5 tokens over text with
    multi-byte characters split across tokens, special tokens and stop strings."""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_path)
    text = ("Grüße aus Köln! 東京は晴れ 🙂🚀 naïve café, x² + y² = z²; "
            "def f(n):\n    return n * 2\n\nThe end. ") * 6
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids[40:40] = [tok.eos_token_id]  # a special token inside the output is skipped
    rng = random.Random(0)
    for stop in ((), ("return n",), ("\n\n", "🚀")):
        ts = TextStream(tok, stop)
        pos, out, stopped = 0, [], False
        while pos < len(ids) and not stopped:
            n = rng.randint(1, 5)
            pushed = ts.push(ids[pos:pos + n])
            out.append(pushed.text)
            pos += pushed.num_tokens
            stopped = pushed.stopped
            full = tok.decode(ids[:pos], skip_special_tokens=True)
            if not stopped:
                assert ts.text == full
                assert full.startswith("".join(out))
        out.append(ts.flush())
        full = tok.decode(ids[:pos], skip_special_tokens=True)
        if stop:
            assert stopped
            assert "".join(out) == full[: min(full.find(s) for s in stop if s in full)]
        else:
            assert "".join(out) == full == tok.decode(ids, skip_special_tokens=True)
