"""Bring your own task: rows read with `datasets`, built-in and user rewards, and the task data files."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qes.config import ConfigError
from qes.tasks import make_task_data, read_task_data, task_of
from qes.tasks.base import RewardRecord
from qes.tasks.countdown.problems import TaskDataError
from qes.tasks.dataset import DatasetRow, DatasetSettings, dataset_task, split_rows
from qes.tasks.rewards import RewardError, answer_of, countdown_row, exact_match, numeric

ROWS = [{"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i), "level": i % 3} for i in range(40)]


def _block(train: str, **dataset) -> dict:
    return {"name": "dataset", "reward": dataset.pop("reward", "numeric"), "train_size": 100, "eval_size": 100,
            "seed": 0, "prompt": {"few_shot": dataset.pop("few_shot", 0)},
            "dataset": {"train": train, "prompt_column": "question", "reference_column": "answer", **dataset}}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("completion", "reference", "fmt", "correct"), [
    ("The answer is 42", "42", True, True),
    ("<answer> 1,234 </answer> and then 7", "1234", True, True),
    ("it is 3.50", "3.5", True, True),
    ("-7", "-7", True, True),
    ("The answer is 41", "42", True, False),
    ("no digits here", "42", False, False),
    ("", "42", False, False),
    ("4\n\n5\n", "5", True, True),  # the last non-empty line
])
def test_numeric_reward(completion: str, reference: str, fmt: bool, correct: bool) -> None:
    record = numeric(completion, reference)
    assert (record.format_ok, record.correct) == (fmt, correct)
    assert record.reward == pytest.approx(0.1 * fmt + 1.0 * correct)


def test_numeric_tolerance_and_a_bad_reference() -> None:
    assert numeric("3.14", "3.14159", tolerance=0.01).correct
    assert not numeric("3.14", "3.14159", tolerance=0.001).correct
    with pytest.raises(RewardError, match="the reference 'twelve' is not a number"):
        numeric("12", "twelve")


@pytest.mark.parametrize(("completion", "reference", "correct"), [
    ("Paris", "paris", True),
    ("  The  Eiffel tower. ", "the eiffel tower", True),
    ("<answer>\"Paris\"</answer>", "Paris", True),
    ("Lyon", "Paris", False),
])
def test_exact_match_reward(completion: str, reference: str, correct: bool) -> None:
    assert exact_match(completion, reference).correct is correct


def test_answer_is_the_first_answer_block_else_the_last_line() -> None:
    assert answer_of("thinking\n<answer>12</answer>\nmore\n") == "12"
    assert answer_of("thinking\n12\n\n") == "12"
    assert answer_of("   \n") is None


# Hostile model output: every built-in reward returns a record, never raises, and its time is bounded by
# the capped input length (the CPU-time bound is loose: the point is that nothing grows without limit).
BOUND_S = 0.05
HOSTILE = ["9" * 100_000, "1," * 50_000, "<answer>" * 10_000, "-" * 200_000 + "1", "\n" * 100_000 + "7",
           "1.1." * 30_000, "<answer>" + "(" * 50_000 + "</answer>", "\x00\ud800" * 10_000]


def _bounded(completion: str) -> list[RewardRecord]:
    gc.disable()
    try:
        start = time.thread_time()
        records = [exact_match(completion, "12"), numeric(completion, "12", 0.5),
                   countdown_row(completion, "8", {"numbers": [3, 5]}, "")]
        cpu = time.thread_time() - start
    finally:
        gc.enable()
    assert cpu < BOUND_S * 3, (cpu, completion[:100])
    for record in records:
        assert isinstance(record, RewardRecord) and record.reward in (0.0, 0.1, 1.0, 1.1)
    return records


@settings(max_examples=1500, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.text(max_size=300), st.sampled_from(["", "<answer>", "The answer is ", "\n"]))
def test_builtin_rewards_on_random_text(text: str, opener: str) -> None:
    _bounded(opener + text)
    _bounded(f"<answer>{text}</answer>")


def test_builtin_rewards_on_huge_hostile_text() -> None:
    for completion in HOSTILE:
        _bounded(completion)


def _write_reward(tmp_path: Path, body: str) -> str:
    (tmp_path / "my_rewards.py").write_text(body)
    return "my_rewards.py:score"


def test_user_reward_values_and_errors(tmp_path: Path) -> None:
    spec = _write_reward(tmp_path, (
        "def score(completion, row):\n"
        "    if row['id'] == 'boom':\n"
        "        raise ValueError('cannot parse ' + completion)\n"
        "    if row['id'] == 'nan':\n"
        "        return float('nan')\n"
        "    if row['id'] == 'dict':\n"
        "        return {'reward': 0.5, 'correct': False, 'format_ok': True, 'answer': completion}\n"
        "    return completion.strip() == row['reference'] and row['fields']['level'] == 1\n"
    ))
    task = dataset_task({"name": "dataset", "reward": spec}, tmp_path)
    assert task.score(" 4 ", DatasetRow("a", "4", {"level": 1}), "").correct is True
    assert task.score("5", DatasetRow("a", "4", {"level": 1}), "").reward == 0.0
    assert task.score("x", DatasetRow("dict", "4"), "") == RewardRecord(True, False, 0.5, "x", "not correct")
    raised = r"reward 'my_rewards.py:score' raised on row 'boom': ValueError: cannot parse x"
    with pytest.raises(RewardError, match=raised):
        task.score("x", DatasetRow("boom", "4"), "")
    with pytest.raises(RewardError, match="on row 'nan' returned nan; a reward must be a finite number"):
        task.score("x", DatasetRow("nan", "4"), "")


@pytest.mark.parametrize(("spec", "body", "message"), [
    ("my_rewards.py:missing", "def score(c, r):\n    return 1\n", "defines no function 'missing'"),
    ("nowhere.py:score", None, "nowhere.py does not exist"),
    ("my_rewards.py:score", "import not_a_module\n", "importing .* failed: ModuleNotFoundError"),
    ("score", None, "expected one of exact_match, numeric, countdown or <file>.py:<function>"),
])
def test_user_reward_that_cannot_load_is_named(tmp_path: Path, spec: str, body: str | None, message: str) -> None:
    if body is not None:
        _write_reward(tmp_path, body)
    with pytest.raises(RewardError, match=message):
        dataset_task({"name": "dataset", "reward": spec}, tmp_path)


def test_a_changed_reward_file_is_refused(tmp_path: Path) -> None:
    spec = _write_reward(tmp_path, "def score(c, r):\n    return 1\n")
    from qes.tasks.rewards import file_sha256

    meta = {"name": "dataset", "reward": spec, "reward_sha256": file_sha256(spec, tmp_path)}
    dataset_task(meta, tmp_path)
    _write_reward(tmp_path, "def score(c, r):\n    return 0\n")
    with pytest.raises(RewardError, match="the file changed since the task data was written"):
        dataset_task(meta, tmp_path)


def _formats(tmp_path: Path) -> dict[str, str]:
    import datasets

    table = datasets.Dataset.from_list(ROWS)
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.to_csv(str(tmp_path / "rows.csv"), index=False)
    table.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    _jsonl(tmp_path / "rows.jsonl", ROWS)
    return {kind: str(tmp_path / name) for kind, name in (("jsonl", "rows.jsonl"), ("json", "rows.json"),
                                                          ("parquet", "rows.parquet"), ("csv", "rows.csv"),
                                                          ("saved", "saved"))}


def test_every_format_gives_the_same_seeded_split(tmp_path: Path) -> None:
    splits = {kind: split_rows(DatasetSettings.from_block(_block(path, eval_fraction=0.25)))
              for kind, path in _formats(tmp_path).items()}
    reference = splits["jsonl"]
    assert 0 < len(reference["eval"]) < 20 and len(reference["train"]) + len(reference["eval"]) == 40
    for kind, split in splits.items():
        for name in ("train", "eval"):
            ids = [r["id"] for r in split[name]]
            assert ids == [r["id"] for r in reference[name]], kind
    # the split is per row, not per position: reordering the file does not move a row to the other side
    _jsonl(tmp_path / "reversed.jsonl", ROWS[::-1])
    reordered = split_rows(DatasetSettings.from_block(_block(str(tmp_path / "reversed.jsonl"), eval_fraction=0.25)))
    assert sorted(r["id"] for r in reordered["eval"]) == sorted(r["id"] for r in reference["eval"])
    other_seed = split_rows(DatasetSettings.from_block({**_block(str(tmp_path / "rows.jsonl")), "seed": 1}))
    assert [r["id"] for r in other_seed["eval"]] != [r["id"] for r in reference["eval"]]


@pytest.mark.parametrize(("edit", "message"), [
    ({"reference_column": "solution"}, r"rows.jsonl: no column 'solution' \(task.dataset.reference_column\); "
                                       r"its columns are \['id', 'question', 'answer', 'level'\]"),
    ({"fields": ["level", "topic"]}, r"no column 'topic' \(task.dataset.fields\[1\]\)"),
    ({"eval": "rows.jsonl"}, "40 prompt.s. are both in the training and the held-out rows"),
])
def test_bad_columns_and_overlaps_are_named(tmp_path: Path, edit: dict, message: str) -> None:
    _jsonl(tmp_path / "rows.jsonl", ROWS)
    with pytest.raises(TaskDataError, match=message):
        split_rows(DatasetSettings.from_block(_block("rows.jsonl", **edit)), tmp_path)


def test_unreadable_and_missing_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "broken.jsonl").write_text('{"question": "a", "answer": 1}\nnot json at all\n')
    with pytest.raises(TaskDataError, match="broken.jsonl: cannot read it as json"):
        split_rows(DatasetSettings.from_block(_block("broken.jsonl")), tmp_path)
    with pytest.raises(TaskDataError, match="rows.txt: unknown data format '.txt'"):
        (tmp_path / "rows.txt").write_text("x")
        split_rows(DatasetSettings.from_block(_block("rows.txt")), tmp_path)


def test_task_data_files_carry_the_task(tiny_float_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_float_dir))
    _jsonl(tmp_path / "rows.jsonl", ROWS)
    block = _block("rows.jsonl", id_column="id", fields=["level"], stop_strings=["\n"], few_shot=2)
    block["prompt"] |= {"system": "Answer with a number.", "assistant_prefix": "The answer is "}
    summary = make_task_data(block, tokenizer, tmp_path / "train.parquet", tmp_path / "eval.parquet", tmp_path)
    assert summary["few_shot"] == 2 and summary["train"]["n"] + summary["eval"]["n"] == 38
    assert task_of(tmp_path / "eval.parquet") == {"name": "dataset", "reward": "numeric", "reward_sha256": None,
                                                  "stop_strings": ["\n"], "tolerance": 1e-6}
    task, rows, prompts, prefixes = read_task_data(tmp_path / "train.parquet", limit=3)
    assert task.stop_strings == ("\n",) and len(rows) == len(prompts) == 3 and set(prefixes) == {"The answer is "}
    first = rows[0]
    assert first.id.startswith("q") and first.fields["level"] in (0, 1, 2)
    assert prompts[0].startswith(tokenizer.apply_chat_template(
        [{"role": "system", "content": "Answer with a number."}], tokenize=False)[:20])
    assert prompts[0].endswith("The answer is ") and "What is 0 + 0?" in prompts[0]  # a worked example
    assert task.score(f"{first.reference}\n", first, "The answer is ").correct
    assert pq.read_table(tmp_path / "train.parquet").column_names == ["id", "prompt", "assistant_prefix", "reference",
                                                                      "fields"]


def test_bad_dataset_config_is_refused_before_reading(tiny_float_dir: Path, tmp_path: Path) -> None:
    block = _block("missing.jsonl", reward="my_rewards.py:score")
    with pytest.raises(ConfigError) as error:
        make_task_data(block, None, tmp_path / "t.parquet", tmp_path / "e.parquet", tmp_path)
    assert "task.dataset.train: missing.jsonl does not exist" in str(error.value)
    assert "task.reward: my_rewards.py does not exist" in str(error.value)
    assert not list(tmp_path.iterdir())


def test_countdown_files_keep_their_behaviour(tiny_float_dir: Path, tmp_path: Path) -> None:
    """Countdown task data has no task metadata; it reads back as Countdown with its stop strings."""
    from transformers import AutoTokenizer

    from qes.tasks.countdown import STOP_STRINGS, TASK

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_float_dir))
    make_task_data({"train_size": 4, "eval_size": 2}, tokenizer, tmp_path / "t.parquet", tmp_path / "e.parquet")
    task, problems, _, prefixes = read_task_data(tmp_path / "t.parquet")
    assert task is TASK and task.stop_strings == STOP_STRINGS and len(problems) == 4
    problem = problems[0]
    assert task.score(f"</think><answer>{problem.solution}</answer>", problem, prefixes[0]).correct


def test_every_registered_task_is_a_schema_choice_and_unknown_names_list_the_known() -> None:
    from qes.schema import schema
    from qes.tasks import UnknownTaskError, known_tasks, task_conflicts, task_kind

    assert list(known_tasks()) == sorted(schema()["properties"]["task"]["properties"]["name"]["enum"])
    assert all(task_kind(name).name == name for name in known_tasks())
    with pytest.raises(UnknownTaskError, match=r"task\.name: unknown task 'gsm8k'; known tasks: countdown, dataset"):
        task_conflicts({"name": "gsm8k"})


def test_a_file_naming_an_unknown_task_is_refused(tmp_path: Path) -> None:
    import pyarrow as pa

    table = pa.table({"id": ["a"]}).replace_schema_metadata({"qes.task": json.dumps({"name": "gsm8k"})})
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet \(its task metadata\): unknown task 'gsm8k'; known tasks"):
        read_task_data(tmp_path / "t.parquet")


def test_each_task_names_its_own_inputs_and_reward() -> None:
    from qes.schema import complete
    from qes.tasks import task_inputs, task_kind

    countdown = complete({"train_file": "train.json"}, "task")
    assert task_inputs(countdown) == ["train.json"]
    dataset = complete({"name": "dataset", "reward": "r.py:score",
                        "dataset": {"train": "rows.jsonl", "eval": "hf:org/rows"}}, "task")
    assert task_inputs(dataset) == ["rows.jsonl", "r.py"]
    assert task_kind("countdown").reward_description({}).startswith("1 for a correct equation")
    assert "reference number" in task_kind("dataset").reward_description({"reward": "numeric"})
    assert "`r.py:score` (sha256 `abc`)" in task_kind("dataset").reward_description(
        {"reward": "r.py:score", "reward_sha256": "abc"})
