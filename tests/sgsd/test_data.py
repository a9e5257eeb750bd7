"""Problem loading: bundled demo set, the shared real files, local formats, detection."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from sgsd.data import DEMO_PATH, Problem, load_problems
from sgsd.eval.verify import extract_boxed

REPO = Path(__file__).resolve().parents[2]
GENERATOR = REPO / "tools" / "make_demo_problems.py"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- demo set
def test_demo_set_size_and_coverage():
    problems = load_problems("demo")
    assert problems == load_problems()  # the default source
    assert len(problems) >= 200
    assert len({p.id for p in problems}) == len(problems)
    assert len({p.problem for p in problems}) == len(problems)
    subjects = Counter(json.loads(line)["subject"] for line in DEMO_PATH.open())
    assert set(subjects) == {"arithmetic", "algebra", "number_theory", "counting", "geometry"}
    assert min(subjects.values()) >= 40
    for p in problems:
        assert isinstance(p, Problem) and p.answer and len(p.problem) < 300, p
        assert extract_boxed(p.solution) == p.answer, p  # worked solution ends in the answer


def test_demo_asset_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("make_demo_problems", GENERATOR)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.render(gen.generate()) == DEMO_PATH.read_text(encoding="utf-8"), (
        "sgsd/assets/demo_problems.jsonl is stale: run python tools/make_demo_problems.py"
    )


def _ints(text):
    return [int(x) for x in re.findall(r"-?\d+", text)]


# Independent re-derivations of a few templates straight from the problem text.
_RECHECKS = [
    (r"Compute \$(\d+) \\times (\d+) \+ (\d+)\$", lambda a, b, c: a * b + c),
    (r"greatest common divisor of \$(\d+)\$ and \$(\d+)\$", math.gcd),
    (r"least common multiple of \$(\d+)\$ and \$(\d+)\$", lambda a, b: a * b // math.gcd(a, b)),
    (r"remainder when \$(\d+)\^\{(\d+)\}\$ is divided by \$(\d+)\$", pow),
    (
        r"committee of \$(\d+)\$ people be chosen from a group of \$(\d+)\$",
        lambda k, n: math.comb(n, k),
    ),
    (
        r"How many positive divisors does \$(\d+)\$",
        lambda n: sum(n % d == 0 for d in range(1, n + 1)),
    ),
    (r"legs of length \$(\d+)\$ and \$(\d+)\$", lambda a, b: math.isqrt(a * a + b * b)),
    (r"convex polygon with \$(\d+)\$ sides", lambda n: (n - 2) * 180),
]


def test_demo_answers_recomputed_independently():
    checked = 0
    for p in load_problems("demo"):
        for pattern, fn in _RECHECKS:
            m = re.search(pattern, p.problem)
            if m:
                assert str(fn(*map(int, m.groups()))) == p.answer, p
                checked += 1
    assert checked >= 70


def test_demo_answers_verify(tmp_path):
    pytest.importorskip("math_verify")
    from sgsd.eval.verify import verify_batch

    problems = load_problems("demo")
    res = verify_batch([f"\\boxed{{{p.answer}}}" for p in problems], [p.answer for p in problems])
    assert all(r.correct for r in res)


# --------------------------------------------------------------------------- shared files
def test_shared_files_load_with_detected_answer_fields(shared_file):
    aime24 = load_problems(shared_file("aime24.jsonl"))
    aime25 = load_problems(shared_file("aime25.jsonl"))
    math500 = load_problems(shared_file("math500.jsonl"))
    assert (len(aime24), len(aime25), len(math500)) == (30, 30, 500)
    # aime24: the answer lives in `solution`; there is no worked solution.
    assert aime24[0].answer == "204" and aime24[0].solution == ""
    assert aime24[0].problem.startswith("Every morning Aya")
    # aime25: the answer lives in `answer`; `solution` is empty.
    assert aime25[0].answer == "70" and aime25[0].solution == ""
    # math500: LaTeX answers and full worked solutions.
    assert math500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert extract_boxed(math500[0].solution) == math500[0].answer
    assert math500[0].id == "test/precalculus/807.json"
    for probs in (aime24, aime25):
        assert all(re.fullmatch(r"\d{1,3}", p.answer) for p in probs)
        assert len({p.id for p in probs}) == 30


def test_explicit_answer_field(shared_file):
    path = shared_file("aime24.jsonl")
    assert [p.answer for p in load_problems(path, answer_field="solution")] == [
        p.answer for p in load_problems(path)
    ]
    with pytest.raises(
        ValueError,
        match=r"row 0: answer field 'answer' is missing or empty; "
        r"fields with a value here: .*solution.*answer_field=",
    ):
        load_problems(path, answer_field="answer")


def test_limit(shared_file):
    assert len(load_problems(shared_file("math500.jsonl"), limit=7)) == 7
    assert load_problems("demo", limit=0) == []
    with pytest.raises(ValueError, match="limit must be None or an int >= 0"):
        load_problems("demo", limit=-1)


# --------------------------------------------------------------------------- detection
def test_undetectable_answer_says_which_field_to_pass(tmp_path):
    rows = [
        {"problem": "p1", "answer": "1", "notes": "x"},
        {"problem": "p2", "answer": "", "notes": "y"},
    ]
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(
        ValueError,
        match=r"cannot detect the answer field \('answer' is empty in "
        r"1 of 2 rows\)\. Fields present: answer, notes, "
        r"problem\. Pass answer_field=",
    ):
        load_problems(path)
    assert load_problems(path, answer_field="notes")[1].answer == "y"


def test_answer_from_boxed_worked_solution(tmp_path):
    rows = [
        {"question": "What is 1+1?", "solution": "1+1 = \\boxed{2}."},
        {"question": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
    ]
    probs = load_problems(_write_jsonl(tmp_path / "worked.jsonl", rows))
    assert [p.answer for p in probs] == ["2", "\\frac{1}{2}"]
    assert probs[0].solution == rows[0]["solution"] and probs[0].id == "worked-0"


def test_dapo_format_rows(tmp_path):
    wrapper = (
        "Solve the following math problem step by step. The last line of your response "
        "should be of the form Answer: $Answer (without quotes) where $Answer is the "
        "answer to the problem.\n\n{}\n\nRemember to put your answer on its own line "
        'after "Answer:".'
    )
    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": wrapper.format(q)}],
            "reward_model": {"ground_truth": a, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"uuid-{i}"},
        }
        for i, (q, a) in enumerate([("What is $2+2$?", "4"), ("What is $3 \\cdot 3$?", "9")])
    ]
    path = _write_jsonl(tmp_path / "dapo.jsonl", rows + rows)  # DAPO repeats its rows
    probs = load_problems(path)
    assert [(p.problem, p.answer, p.id) for p in probs] == [
        ("What is $2+2$?", "4", "uuid-0"),
        ("What is $3 \\cdot 3$?", "9", "uuid-1"),
    ]
    with pytest.warns(UserWarning, match="row ids are not unique"):
        dup = load_problems(path, dedupe=False)
    assert len(dup) == 4 and dup[2].id == "dapo-2"


def test_json_formats(tmp_path):
    rows = [{"problem": "a", "answer": 1}, {"problem": "b", "answer": 2.0}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    assert [p.answer for p in load_problems(tmp_path / "list.json")] == ["1", "2"]
    (tmp_path / "splits.json").write_text(json.dumps({"train": rows, "test": rows[:1]}))
    assert len(load_problems(tmp_path / "splits.json", split="test")) == 1
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_problems(tmp_path / "splits.json", split="dev")


def test_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        if importlib.util.find_spec("pandas") is None:
            with pytest.raises(ImportError, match="needs pyarrow"):
                load_problems(path)
        return
    pq.write_table(pa.table({"problem": ["x?"], "answer": ["3"]}), path)
    assert load_problems(path) == [Problem("p-0", "x?", "3", "")]


@pytest.mark.parametrize(
    ("source", "exc", "match"),
    [
        ("nonsense", ValueError, "unknown problem source 'nonsense'"),
        ("/no/such/file.jsonl", FileNotFoundError, "problem file not found"),
        (42, TypeError, "source must be a str or Path"),
    ],
)
def test_bad_sources(source, exc, match):
    with pytest.raises(exc, match=match):
        load_problems(source)


def test_hub_source_fails_clearly_offline():
    # No hub here: either `datasets` is missing or the download fails; both say what to do.
    with pytest.raises((ImportError, RuntimeError), match="(datasets|local .jsonl)"):
        load_problems("aime24")


def test_bad_rows(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"problem": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_problems(bad_json)
    no_text = _write_jsonl(tmp_path / "notext.jsonl", [{"answer": "1", "body": "x"}])
    with pytest.raises(ValueError, match="row 0: no problem text"):
        load_problems(no_text)
    not_obj = tmp_path / "notobj.json"
    not_obj.write_text("[1, 2]")
    with pytest.raises(TypeError, match="row 0 is not an object"):
        load_problems(not_obj)
