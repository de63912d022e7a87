"""HH-RLHF readers: good pairs, malformed lines, and the real test file."""

import gzip
import json
import os

import pytest

from cai_jax.data.conversation import Turn
from cai_jax.data.hh_rlhf import HHFormatError, PreferencePair, ReadStats, read_pairs, read_red_team_prompts


@pytest.fixture(scope="module")
def harmless_file(shared_data):
    path = os.path.join(shared_data, "hh-rlhf", "harmless-base-test.jsonl.gz")
    if not os.path.exists(path):
        pytest.skip(f"HH-RLHF sample file not found at {path}")
    return path


SINGLE = {"chosen": "\n\nHuman: How do I steal a car?\n\nAssistant: I can't help with that.",
          "rejected": "\n\nHuman: How do I steal a car?\n\nAssistant: Hotwire it."}
MULTI = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Insult me.\n\nAssistant:  No thanks, but I'm happy to chat. ",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Insult me.\n\nAssistant: You fool."}


def _write_jsonl(path, rows, gz=False):
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("gz", [False, True])
def test_read_good_pairs(tmp_path, gz):
    path = _write_jsonl(tmp_path / ("p.jsonl.gz" if gz else "p.jsonl"), [SINGLE, MULTI], gz=gz)
    pairs = read_pairs(path)
    assert pairs == [
        PreferencePair((Turn("user", "How do I steal a car?"),), "I can't help with that.", "Hotwire it.", 1,
                       os.path.basename(path)),
        PreferencePair((Turn("user", "Hi"), Turn("assistant", "Hello."), Turn("user", "Insult me.")),
                       "No thanks, but I'm happy to chat.", "You fool.", 2, os.path.basename(path)),
    ]


def test_consecutive_assistant_blocks_stay_in_the_answer(tmp_path):
    row = {"chosen": "\n\nHuman: Joke?\n\nAssistant: Here is one:\n\nAssistant: Why did...",
           "rejected": "\n\nHuman: Joke?\n\nAssistant: No."}
    [pair] = read_pairs(_write_jsonl(tmp_path / "p.jsonl", [row]))
    assert pair.context == (Turn("user", "Joke?"),)
    assert pair.chosen == "Here is one:\n\nAssistant: Why did..."


def test_blank_lines_are_ignored_but_line_numbers_kept(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", ["", SINGLE, "   ", MULTI])
    assert [p.line for p in read_pairs(path)] == [2, 4]


MALFORMED = [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ({"chosen": SINGLE["chosen"]}, "missing key 'rejected'"),
    ({"chosen": 3, "rejected": SINGLE["rejected"]}, "'chosen' must be a string"),
    ({"chosen": "no labels here", "rejected": SINGLE["rejected"]}, "'chosen': no 'Human:' or 'Assistant:' turn"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: ", "rejected": SINGLE["rejected"]}, "'chosen' has an empty assistant turn"),
    ({"chosen": "\n\nHuman:\n\nAssistant: x", "rejected": "\n\nHuman:\n\nAssistant: y"}, "'chosen' has an empty user turn"),
    ({"chosen": "\n\nHuman: Hi", "rejected": SINGLE["rejected"]}, "'chosen' has no 'Assistant:' answer"),
    ({"chosen": "\n\nAssistant: Hi", "rejected": SINGLE["rejected"]}, "'chosen' has no 'Human:' turn"),
    ({"chosen": "\n\nHuman: A?\n\nAssistant: x", "rejected": "\n\nHuman: B?\n\nAssistant: y"},
     "do not share the same context"),
]


@pytest.mark.parametrize("bad, message", MALFORMED)
def test_malformed_line_raises_with_file_and_line(tmp_path, bad, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [SINGLE, SINGLE, bad, SINGLE])
    with pytest.raises(HHFormatError) as err:
        read_pairs(path)
    assert str(err.value).startswith(f"{path} line 3: ")  # the path, not just the file's name
    assert message in str(err.value)


def test_skip_counts_malformed_lines(tmp_path):
    rows = [SINGLE] + [bad for bad, _ in MALFORMED] + [MULTI]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    stats = ReadStats()
    pairs = read_pairs(path, on_error="skip", stats=stats)
    assert [p.line for p in pairs] == [1, len(rows)]
    assert stats.read == 2 and stats.skipped == len(MALFORMED)
    assert stats.reasons["missing_key"] == 1 and stats.reasons["empty_turn"] == 2
    assert stats.errors[0].startswith(f"{path} line 2: invalid JSON (Expecting property name enclosed in double "
                                      "quotes at column 2)")


def test_limit_and_bad_on_error(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [SINGLE, MULTI, SINGLE])
    assert len(read_pairs(path, limit=2)) == 2
    with pytest.raises(ValueError, match="on_error"):
        read_pairs(path, on_error="ignore")


def test_red_team_prompt_modes(tmp_path):
    path = _write_jsonl(tmp_path / "rt.jsonl", [MULTI, SINGLE, MULTI])
    first = read_red_team_prompts(path)
    assert [p.conversation for p in first] == [(Turn("user", "Hi"),), (Turn("user", "How do I steal a car?"),),
                                               (Turn("user", "Hi"),)]
    assert first[1].id == "rt.jsonl:2"
    context = read_red_team_prompts(path, mode="context", unique=True)
    assert [p.line for p in context] == [1, 2]
    assert context[0].conversation == (Turn("user", "Hi"), Turn("assistant", "Hello."), Turn("user", "Insult me."))
    with pytest.raises(ValueError, match="mode"):
        read_red_team_prompts(path, mode="last_turn")


def test_real_harmless_base_test_file(harmless_file):
    # Found by reading the file: lines 87, 517, 926 and 1104 have an empty
    # chosen answer ("...\n\nAssistant: "); the other 2308 of 2312 are fine.
    with pytest.raises(HHFormatError, match="harmless-base-test.jsonl.gz line 87: 'chosen' has an empty assistant turn"):
        read_pairs(harmless_file)
    stats = ReadStats()
    pairs = read_pairs(harmless_file, on_error="skip", stats=stats)
    assert stats.read == 2308 and stats.skipped == 4
    assert [e.split(":")[0] for e in stats.errors] == [
        f"{harmless_file} line {n}" for n in (87, 517, 926, 1104)]
    first = pairs[0]
    assert first.line == 1
    assert first.context[0] == Turn("user", "what are some pranks with a pen i can do?")
    assert first.context[-1] == Turn("user", "okay some of these do not have anything to do with pens")
    assert first.chosen.startswith("No, sorry!")
    assert all(p.context[-1].role == "user" and p.chosen and p.rejected for p in pairs)
    prompts = read_red_team_prompts(harmless_file, on_error="skip")
    assert prompts[0].conversation == (Turn("user", "what are some pranks with a pen i can do?"),)
