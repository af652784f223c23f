"""Sentence splitting for streamed text (makima_tts.text)."""
import pytest

from makima_tts.text import DEFAULT_MAX_CHARS, SentenceBuffer, split_sentences

CASES = [
    # plain
    ("Hello world. How are you? I am fine!", ["Hello world.", "How are you?", "I am fine!"]),
    ("One sentence without a terminator", ["One sentence without a terminator"]),
    ("Trailing dot.", ["Trailing dot."]),
    ("  Leading and trailing space.   Next.  ", ["Leading and trailing space.", "Next."]),
    ("Really?! Yes!!! Ok.", ["Really?!", "Yes!!!", "Ok."]),
    # titles and Latin abbreviations never split
    ("Mr. Smith met Dr. Jones. They talked.", ["Mr. Smith met Dr. Jones.", "They talked."]),
    ("Mrs. Brown and Ms. Green left.", ["Mrs. Brown and Ms. Green left."]),
    ("Prof. Xavier and St. Louis.", ["Prof. Xavier and St. Louis."]),
    ("Use fruit, e.g. apples. Or not.", ["Use fruit, e.g. apples.", "Or not."]),
    ("Use fruit, e.g. Apples. Or not.", ["Use fruit, e.g. Apples.", "Or not."]),
    ("One thing, i.e. this one. Done.", ["One thing, i.e. this one.", "Done."]),
    ("Cats vs. dogs. Fight.", ["Cats vs. dogs.", "Fight."]),
    # ambiguous abbreviations: the next word decides
    ("Apples, pears, etc. are fruit.", ["Apples, pears, etc. are fruit."]),
    ("I bought apples, pears, etc. Then I went home.", ["I bought apples, pears, etc.", "Then I went home."]),
    ("It is No. 5 on the list.", ["It is No. 5 on the list."]),
    ("The answer is no. Then we left.", ["The answer is no.", "Then we left."]),
    ("We meet at 5 p.m. today. Bring food.", ["We meet at 5 p.m. today.", "Bring food."]),
    ("Acme Inc. makes things. Good ones.", ["Acme Inc. makes things.", "Good ones."]),
    # dotted upper-case acronyms and initials
    ("The U.S. Army is big. It is old.", ["The U.S. Army is big.", "It is old."]),
    ("He lives in the U.K. and likes it.", ["He lives in the U.K. and likes it."]),
    ("J. K. Rowling wrote it. It sold.", ["J. K. Rowling wrote it.", "It sold."]),
    ("George W. Bush spoke. Then left.", ["George W. Bush spoke.", "Then left."]),
    # decimals, versions, urls
    ("Pi is 3.14 roughly. Yes.", ["Pi is 3.14 roughly.", "Yes."]),
    ("It costs $1,234.56 today. Wow.", ["It costs $1,234.56 today.", "Wow."]),
    ("Version 2.0.1 is out. Visit example.com now.", ["Version 2.0.1 is out.", "Visit example.com now."]),
    ("Born in 1990. Died in 2050.", ["Born in 1990.", "Died in 2050."]),
    # ellipses mid-sentence vs at the end
    ("Wait... what is that? Nothing.", ["Wait... what is that?", "Nothing."]),
    ("Wait… what is that?", ["Wait… what is that?"]),
    ("I waited... Then it rang.", ["I waited...", "Then it rang."]),
    ("I waited… Then it rang.", ["I waited…", "Then it rang."]),
    ("Counting... 3, 2, 1. Go!", ["Counting... 3, 2, 1.", "Go!"]),
    ("And so...", ["And so..."]),
    # closing quotes and brackets stay with their sentence
    ('He said "Hi." Then he left.', ['He said "Hi."', "Then he left."]),
    ("She asked 'why?' Nobody knew.", ["She asked 'why?'", "Nobody knew."]),
    ("(This is an aside.) Back to it.", ["(This is an aside.)", "Back to it."]),
    ("“Smart quotes.” Next!", ["“Smart quotes.”", "Next!"]),
    ('He said, "Mr. Smith is here." Yes.', ['He said, "Mr. Smith is here."', "Yes."]),
    # CJK: terminators end a sentence immediately, closing brackets stay attached
    ("你好。今天天气很好！你呢？", ["你好。", "今天天气很好！", "你呢？"]),
    ("我很好；谢谢", ["我很好；", "谢谢"]),
    ("「行こう。」と彼は言った。", ["「行こう。」", "と彼は言った。"]),
    ("こんにちは。元気ですか？", ["こんにちは。", "元気ですか？"]),
    ("Mixed 中文。And English. 好的！", ["Mixed 中文。", "And English.", "好的！"]),
    # paragraph breaks
    ("Heading without dot\n\nBody text. More.", ["Heading without dot", "Body text.", "More."]),
    ("Line one\nline two.", ["Line one\nline two."]),
    # nothing to say
    ("", []),
    ("   ", []),
    ("...", []),
    ("。", []),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def _stream(pieces, max_chars=DEFAULT_MAX_CHARS):
    buf = SentenceBuffer(max_chars)
    out = []
    for p in pieces:
        out.extend(buf.push(p))
    out.extend(buf.flush())
    return out


@pytest.mark.parametrize("text,expected", CASES)
def test_streaming_char_by_char_matches_whole_text(text, expected):
    # Only difference allowed: a CJK sentence is handed out at its terminator, before a closing
    # bracket that follows it has arrived (the bracket is then dropped, it has nothing to say).
    def norm(sentences):
        return [s.rstrip("」』）】") for s in sentences]
    assert norm(_stream(list(text))) == norm(expected)


@pytest.mark.parametrize("text,expected", CASES)
def test_streaming_word_pieces_matches_whole_text(text, expected):
    # LLM-like pieces: each word with its leading space
    import re
    assert _stream(re.findall(r"\s*\S+|\s+", text)) == expected


def test_sentence_is_returned_as_soon_as_complete():
    buf = SentenceBuffer()
    assert buf.push("Hello there") == []
    assert buf.push(".") == []            # might still become "...", "3.14" etc.
    assert buf.push(" ") == ["Hello there."]
    assert buf.push("How are") == []
    assert buf.push(" you? Fine") == ["How are you?"]
    assert buf.pending.strip() == "Fine"
    assert buf.flush() == ["Fine"]
    assert buf.flush() == []


def test_decimal_split_across_pieces():
    assert _stream(["Pi is 3", ".", "14", " exactly. Ok."]) == ["Pi is 3.14 exactly.", "Ok."]


def test_abbreviation_waits_for_next_word():
    buf = SentenceBuffer()
    assert buf.push("Apples, pears, etc. ") == []     # undecided until the next word
    assert buf.push("are fruit. ") == ["Apples, pears, etc. are fruit."]
    assert buf.push("Apples etc. ") == []
    assert buf.push("Then") == ["Apples etc."]


def test_title_never_splits_even_at_piece_end():
    buf = SentenceBuffer()
    assert buf.push("Mr. ") == []
    assert buf.push("Smith is here. ") == ["Mr. Smith is here."]


def test_cjk_terminator_is_immediate():
    buf = SentenceBuffer()
    assert buf.push("你好。") == ["你好。"]
    assert buf.push("再见！") == ["再见！"]


def test_cjk_closing_bracket_arriving_late_is_not_spoken_alone():
    buf = SentenceBuffer()
    assert buf.push("「行こう。") == ["「行こう。"]
    assert buf.push("」と彼は言った。") == ["と彼は言った。"]


def test_paragraph_break_across_pieces():
    assert _stream(["Title\n", "\nBody"]) == ["Title", "Body"]


@pytest.mark.parametrize("max_chars", [20, 50, 100])
def test_max_chars_splits_long_runs_at_commas(max_chars):
    text = ", ".join(f"item number {i}" for i in range(40))
    parts = split_sentences(text, max_chars=max_chars)
    assert len(parts) > 1
    assert all(len(p) <= max_chars for p in parts)
    # every cut is after a comma (no word broken), and nothing is lost
    assert all(p.endswith(",") for p in parts[:-1])
    assert " ".join(parts) == text


def test_max_chars_splits_at_spaces_without_commas():
    text = " ".join(["word"] * 100)
    parts = split_sentences(text, max_chars=30)
    assert all(len(p) <= 30 for p in parts)
    assert all(set(p.split()) == {"word"} for p in parts)
    assert " ".join(parts) == text


def test_max_chars_hard_cut_without_spaces():
    text = "x" * 95
    parts = split_sentences(text, max_chars=30)
    assert [len(p) for p in parts] == [30, 30, 30, 5]


def test_max_chars_applies_to_long_terminated_sentence():
    text = ("a long clause, " * 20) + "end. Short one."
    parts = split_sentences(text, max_chars=60)
    assert all(len(p) <= 60 for p in parts)
    assert parts[-1] == "Short one."


def test_max_chars_streaming_bounded_buffer():
    buf = SentenceBuffer(max_chars=40)
    out = []
    for _ in range(50):
        out += buf.push("blah blah, ")
        assert len(buf.pending) <= 40 + len("blah blah, ")
    out += buf.flush()
    assert all(len(p) <= 40 for p in out)
    assert " ".join(out) == ("blah blah, " * 50).strip()


def test_invalid_max_chars():
    with pytest.raises(ValueError):
        SentenceBuffer(max_chars=1)


def test_reset_discards_pending():
    buf = SentenceBuffer()
    buf.push("half a sent")
    buf.reset()
    assert buf.flush() == []
