"""Countdown problems, prompts and reward: pinned values."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from qes.tasks.countdown import (
    DEMONSTRATIONS,
    CountdownConfig,
    Problem,
    PromptStyle,
    TaskDataError,
    TaskSettings,
    _assistant_message,
    build_prompt,
    check_answer,
    check_disjoint,
    evaluate_expression,
    extract_answer,
    format_ok,
    generate_split,
    load_problems_json,
    make_task_data,
    read_task_parquet,
    reward,
    write_task_parquet,
)

NUMS = (3, 5, 2)


def answer(expr: str) -> str:
    return f"<think>try things</think>\n<answer>{expr}</answer>"


# ---------------------------------------------------------------- reward


@pytest.mark.parametrize(
    ("response", "numbers", "target", "fmt", "correct", "value"),
    [
        (answer("(3 + 5) * 2"), NUMS, 16, True, True, 1.1),
        (answer("(3+5)*2"), NUMS, 16, True, True, 1.1),
        (answer(" 2 * (5 + 3) "), NUMS, 16, True, True, 1.1),
        (answer("(3 + 5) × 2"), NUMS, 16, True, True, 1.1),  # × normalised to *
        (answer("(3 + 5) * 2 = 16"), NUMS, 16, True, True, 1.1),  # trailing '= target' accepted
        (answer("(3 + 5) * 2 = 15"), NUMS, 16, True, False, 0.1),
        (answer("(3 + 5) * 2"), NUMS, 15, True, False, 0.1),  # wrong result
        (answer("3 + 5 * 2"), NUMS, 16, True, False, 0.1),  # precedence matters
        (answer("(3 + 5) * 2 * 2"), NUMS, 32, True, False, 0.1),  # a number used twice
        (answer("3 + 5"), NUMS, 8, True, False, 0.1),  # a number unused
        (answer("(3 + 3) * 2"), NUMS, 12, True, False, 0.1),  # wrong numbers
        (answer("(7 / 2) * 2"), (7, 2, 2), 7, True, True, 1.1),  # fraction back to an integer
        (answer("7 / 2"), (7, 2), 3, True, False, 0.1),  # 3.5 is not 3
        (answer("5 / (3 - 3)"), (5, 3, 3), 0, True, False, 0.1),  # division by zero
        (answer("-3 + 5 + 2"), NUMS, 4, True, False, 0.1),  # no unary minus
        (answer("3 ** 2"), (3, 2), 9, True, False, 0.1),
        (answer("35 + 2"), NUMS, 37, True, False, 0.1),  # digits glued into a new number
        (answer("١ + 2"), (1, 2), 3, True, False, 0.1),  # unicode digit
        ("<answer>(3 + 5) * 2</answer>", NUMS, 16, False, True, 1.0),  # correct, no think block
        ("<think>x</think> <answer>(3 + 5) * 2</answer> and more", NUMS, 16, False, True, 1.0),
        ("<think>x</think> (3 + 5) * 2", NUMS, 16, False, False, 0.0),  # missing answer tags
        ("<think>x <answer>(3 + 5) * 2", NUMS, 16, False, False, 0.0),
        ("", NUMS, 16, False, False, 0.0),
    ],
)
def test_reward_pinned(response, numbers, target, fmt, correct, value):
    rec = reward(response, numbers, target)
    assert (rec.format_ok, rec.correct) == (fmt, correct), rec
    assert rec.reward == pytest.approx(value)
    assert (rec.reason == "ok") == correct


def test_reward_with_assistant_prefix():
    rec = reward("reasoning</think>\n<answer>(3 + 5) * 2</answer>", NUMS, 16, prefix="<think>")
    assert rec.format_ok and rec.correct and rec.reward == pytest.approx(1.1)
    assert not reward("reasoning</think>\n<answer>1</answer>", (1,), 1).format_ok


def test_reasons():
    assert check_answer("5 / (3 - 3)", (5, 3, 3), 1) == "division by zero"
    assert check_answer("3 + 5", NUMS, 8) == "numbers not used exactly once each"
    assert check_answer("3 + 5 + 2", NUMS, 11) == "value differs from target"
    assert check_answer("", NUMS, 1) == "empty expression"


@pytest.mark.parametrize(
    "text",
    [
        "<think>a</think><answer>1</answer>",
        "  <think>a\nb</think>\n\n<answer> 1 </answer>\n",
        "Let me solve this step by step.\n<think>a</think> <answer>1</answer>",
    ],
)
def test_format_accepts(text):
    assert format_ok(text)


@pytest.mark.parametrize(
    "text",
    [
        "<answer>1</answer>",
        "<think>a</think>",
        "<think>a</think> text <answer>1</answer>",
        "<think>a</think><answer>1</answer> trailing",
        "<think>a<think>b</think><answer>1</answer>",
        "<think>a <answer>2</answer></think><answer>1</answer>",
        "<answer>0</answer><think>a</think><answer>1</answer>",
        "<think>a</think><answer>1<answer>2</answer>",
        "<think>a</think><answer>1</answer></answer>",
        "<think>a</think><answer>1",
    ],
)
def test_format_rejects(text):
    assert not format_ok(text)


def test_extract_answer_first_pair():
    assert extract_answer("x <answer>1</answer> <answer>2</answer>") == "1"
    assert extract_answer("<answer>1") is None
    assert extract_answer("nothing") is None


def test_expression_bounds_fast():
    for bad in [
        "9**9**9",
        "99999999999**99999",
        "(" * 10_000 + "1" + ")" * 10_000,
        "1" * 100_000,
        "-" * 200 + "1",
        "1" + "*99999999" * 28,
    ]:
        assert check_answer(bad, (1,), 1) != "ok"
    with pytest.raises(ValueError, match="nested"):
        evaluate_expression("(" * 40 + "1" + ")" * 40)


def test_large_intermediate_rejected():
    expr = "*".join(["999999999"] * 25)  # about 750 bits: over the cap
    assert check_answer(expr, (999999999,) * 25, 1) == "intermediate value too large"


# ---------------------------------------------------------------- generator

SMALL = CountdownConfig(
    num_count_min=2,
    num_count_max=3,
    number_min=1,
    number_max=10,
    target_min=1,
    target_max=20,
    train_size=100,
    eval_size=50,
    seed=3,
)


def test_generator_pinned():
    cfg = CountdownConfig(3, 4, 1, 100, 1, 100, train_size=3, eval_size=2, seed=0)  # the paper's difficulty
    train = generate_split(cfg, "train")
    assert [(p.numbers, p.target, p.solution) for p in train] == [
        ((74, 8, 52), 30, "8 + (74 - 52)"),
        ((18, 59, 76), 1, "(18 + 59) - 76"),
        ((59, 43, 35), 67, "43 + (59 - 35)"),
    ]
    assert [p.id for p in train] == ["train-000000", "train-000001", "train-000002"]


def test_generator_solvable_disjoint_deterministic():
    train, held = generate_split(SMALL, "train"), generate_split(SMALL, "eval")
    assert len(train) == 100 and len(held) == 50
    for p in train + held:
        assert check_answer(p.solution, p.numbers, p.target) == "ok", p
        assert 2 <= len(p.numbers) <= 3 and all(1 <= n <= 10 for n in p.numbers)
        assert 1 <= p.target <= 20
    assert len({p.key for p in train}) == 100 and len({p.key for p in held}) == 50
    check_disjoint(train, held)
    assert generate_split(SMALL, "train") == train


def test_split_prefix_stable_and_independent_of_other_size():
    a = generate_split(SMALL, "eval")
    b = generate_split(CountdownConfig(**{**SMALL.__dict__, "eval_size": 20, "train_size": 7}), "eval")
    assert b == a[:20]


def test_generator_exhausted_space_errors():
    tiny = CountdownConfig(
        num_count_min=2,
        num_count_max=2,
        number_min=1,
        number_max=2,
        target_min=1,
        target_max=4,
        train_size=50,
        eval_size=0,
    )
    with pytest.raises(ValueError, match="too few problems"):
        generate_split(tiny, "train")


def test_config_validation():
    with pytest.raises(ValueError):
        CountdownConfig(num_count_min=4, num_count_max=3)
    with pytest.raises(ValueError):
        CountdownConfig(target_min=0)


def test_check_disjoint_raises():
    p = Problem("a", (1, 2), 3)
    with pytest.raises(ValueError, match="also occurs"):
        check_disjoint([p], [Problem("b", (2, 1), 3)])


# ---------------------------------------------------------------- JSON files


def test_load_json(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"numbers": [1, 2, 3], "target": 6}, {"nums": [4, 5], "target": 9}]))
    problems = load_problems_json(path, split="eval")
    assert [(p.id, p.numbers, p.target) for p in problems] == [
        ("eval-000000", (1, 2, 3), 6),
        ("eval-000001", (4, 5), 9),
    ]
    assert len(load_problems_json(path, limit=1)) == 1
    with pytest.raises(TaskDataError, match="2 problems, but 3"):
        load_problems_json(path, limit=3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"numbers": [1]}, "expected a JSON list"),
        ([{"numbers": [1, 2]}], "entry 0: missing field 'target'"),
        ([{"numbers": [1], "target": 1}, {"target": 3}], "entry 1: missing field 'numbers'"),
        ([{"numbers": [1, "2"], "target": 3}], r"entry 0: field 'numbers'\[1\]"),
        ([{"numbers": [1, True], "target": 3}], r"entry 0: field 'numbers'\[1\]"),
        ([{"numbers": [], "target": 3}], "entry 0: field 'numbers' must be a non-empty list"),
        ([{"numbers": [1, 2], "target": 3.0}], "entry 0: field 'target' must be an integer"),
        ([[1, 2, 3]], "entry 0: expected an object"),
    ],
)
def test_load_json_errors(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TaskDataError, match=message):
        load_problems_json(path)


def test_load_json_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[{")
    with pytest.raises(TaskDataError, match="not valid JSON"):
        load_problems_json(path)


# ---------------------------------------------------------------- prompts and files


class ChatMLTokenizer:
    """Just enough tokenizer for prompt building: a ChatML-style chat template."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + "<|im_start|>assistant\n"


def test_prompt_and_parquet_roundtrip(tmp_path):
    problems = generate_split(SMALL, "eval")[:5]
    style = PromptStyle()
    prompts = [build_prompt(ChatMLTokenizer(), p, style) for p in problems]
    assert prompts[0].startswith("<|im_start|>system\n")
    assert prompts[0].endswith("<|im_start|>assistant\n" + style.assistant_prefix)
    nums = ", ".join(map(str, problems[0].numbers[:-1]))
    assert nums in prompts[0] and str(problems[0].target) in prompts[0]
    assert Counter(prompts[0].split("<|im_start|>user")[1:]).total() == 1 + len(style.examples)
    path = tmp_path / "eval.parquet"
    write_task_parquet(problems, prompts, style.assistant_prefix, path)
    back, back_prompts, prefixes = read_task_parquet(path)
    assert back == problems and back_prompts == prompts
    assert prefixes == [style.assistant_prefix] * 5
    assert read_task_parquet(path, limit=2)[0] == problems[:2]


# ---------------------------------------------------------------- the task stage


def test_task_settings_from_dict():
    s = TaskSettings.from_dict({"num_count_max": 3, "eval_size": 7, "prompt": {"few_shot": 0}})
    assert s.generator.num_count_max == 3 and s.generator.eval_size == 7 and s.prompt.examples == ()
    assert TaskSettings.from_dict({}) == TaskSettings()
    with pytest.raises(ValueError, match=r"task: Additional properties are not allowed \('sizes' was unexpected\)"):
        TaskSettings.from_dict({"sizes": 3})
    with pytest.raises(ValueError, match=r"task\.prompt: Additional properties are not allowed \('shots'"):
        TaskSettings.from_dict({"prompt": {"shots": 1}})
    with pytest.raises(ValueError, match=r"task\.name: 'gsm8k' is not one of \['countdown', 'dataset'\]"):
        TaskSettings.from_dict({"name": "gsm8k"})
    with pytest.raises(ValueError, match=r"task\.num_count_min \(4\) is greater than task\.num_count_max \(3\)"):
        TaskSettings.from_dict({"num_count_min": 4})
    with pytest.raises(ValueError, match="may only use the fields"):
        TaskSettings.from_dict({"prompt": {"user_template": "reach {goal}"}})
    nulls = TaskSettings.from_dict({"prompt": {"system": None, "user_template": None, "assistant_prefix": None}})
    assert nulls.prompt == PromptStyle()


def test_make_task_data(tmp_path):
    settings = TaskSettings.from_dict({**SMALL.__dict__, "train_size": 20, "eval_size": 10})
    summary = make_task_data(settings, ChatMLTokenizer(), tmp_path / "train.parquet", tmp_path / "eval.parquet")
    assert summary["train"]["n"] == 20 and summary["eval"]["n"] == 10
    train, train_prompts, _ = read_task_parquet(tmp_path / "train.parquet")
    held, _, prefixes = read_task_parquet(tmp_path / "eval.parquet")
    check_disjoint(train, held)
    assert train == generate_split(settings.generator, "train")
    assert set(prefixes) == {settings.prompt.assistant_prefix}
    assert all(p.startswith("<|im_start|>system") for p in train_prompts)


def test_make_task_data_from_files(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps([{"numbers": [1, 2], "target": 3}] * 1))
    (tmp_path / "eval.json").write_text(json.dumps([{"numbers": [2, 1], "target": 3}]))
    settings = TaskSettings.from_dict({"train_file": str(tmp_path / "train.json"), "train_size": 1, "eval_size": 5})
    make_task_data(settings, ChatMLTokenizer(), tmp_path / "a.parquet", tmp_path / "b.parquet")
    assert read_task_parquet(tmp_path / "a.parquet")[0][0].numbers == (1, 2)
    held = read_task_parquet(tmp_path / "b.parquet")[0]
    assert len(held) == 5 and ((1, 2), 3) not in {p.key for p in held}  # generated eval skips the file's keys
    assert ((1, 2), 3) in {p.key for p in generate_split(settings.generator, "eval")}
    clash = TaskSettings.from_dict(
        {
            **settings.__dict__["generator"].__dict__,
            "train_size": 1,
            "eval_size": 1,
            "train_file": str(tmp_path / "train.json"),
            "eval_file": str(tmp_path / "eval.json"),
        }
    )
    with pytest.raises(ValueError, match="also occurs in the training set"):
        make_task_data(clash, ChatMLTokenizer(), tmp_path / "c.parquet", tmp_path / "d.parquet")


def test_demonstrations_score_full_marks_and_never_occur_in_the_data():
    style = PromptStyle()
    for demo in DEMONSTRATIONS:
        text = build_prompt(ChatMLTokenizer(), demo.problem, style)
        assert text.endswith(style.assistant_prefix)
        turn = _assistant_message(style, demo)
        assert reward(turn, demo.problem.numbers, demo.problem.target).reward == pytest.approx(1.1)
    cfg = CountdownConfig(
        num_count_min=2, num_count_max=3, number_min=1, number_max=7, target_min=1, target_max=7, train_size=60
    )
    keys = {p.key for p in generate_split(cfg, "train")}
    assert not keys & {d.problem.key for d in DEMONSTRATIONS}
