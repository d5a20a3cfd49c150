"""A user's data and task files are checked before any work: each mistake is one line on stderr naming the file,
line, field and the fix, exit status 2, no traceback (--debug shows it), and it comes before the model loads or a
session opens. A user's own 3-class task trains and evaluates through a tiny cloud."""
from __future__ import annotations

import copy
import json
import logging

import pytest

import tasks as T
from cli.main import main
from edge.data import check_data, load_items
from edge.trainer import EdgeConfig, train
from tests.conftest import TOKENS

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(120)]  # an empty file must not hang


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def cli_error(capsys, tmp_path, *args, model=None) -> str:
    """`tandem edge train ARGS` with a model that does not exist and no cloud: the one stderr line it fails with."""
    model = model or str(tmp_path / "no-such-model")
    with pytest.raises(SystemExit) as e:
        main(["edge", "train", "--cloud", "127.0.0.1:9", "--patience", "1", "--model", model, "--no-progress",
              "--steps", "2", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("tandem: error: ") and "Traceback" not in line
    assert "no-such-model" not in line  # the data was checked first: the model never loaded
    return line


GOOD_DEV = "sentence\tlabel\nfine\t1\nawful\t0\n"

# (file name, content, what the one line must say: file, line, field, problem, fix)
BAD_TRAIN = {
    "empty": ("train.tsv", "", ["train.tsv:", "is empty", "fix:"]),
    "header only": ("train.tsv", "sentence\tlabel\n", ["train.tsv:", "header but no examples", "fix:"]),
    "no label column": ("train.tsv", "sentence\tlbl\nfine\t1\n",
                        ["train.tsv, line 1, field 'label'", "no 'label' column", "'lbl'", "fix: name the columns"]),
    "no sentence column": ("train.csv", "review,label\nfine,1\n",
                           ["train.csv, line 1, field 'sentence'", "no 'sentence' column", "fix:", "'text'"]),
    "word label": ("train.tsv", "sentence\tlabel\nfine\t1\nbad\tgreat\n",
                   ["train.tsv, line 3, field 'label'", "'great' is not a label of sst2",
                    "fix: use a class number 0..1 or a label name (negative, positive)"]),
    "label 5": ("train.tsv", "sentence\tlabel\nfine\t5\n",
                ["train.tsv, line 2, field 'label'", "label 5 is out of range: sst2 has 2 classes, 0..1", "fix:"]),
    "label -1": ("train.tsv", "sentence\tlabel\nfine\t1\nbad\t-1\n",
                 ["train.tsv, line 3, field 'label'", "label -1 is out of range", "fix:"]),
    "latin-1": ("train.tsv", b"sentence\tlabel\nfine\t1\ncaf\xe9 cr\xe8me\t1\n",
                ["train.tsv, line 3", "0xe9 is not UTF-8", "fix: save it as UTF-8", "iconv"]),
    "bad json line": ("train.jsonl", '{"sentence": "fine", "label": 1}\n{"sentence": "bad", label: 0}\n',
                      ["train.jsonl, line 2", "not valid JSON", "fix: write one JSON object per line"]),
    "json key missing": ("train.jsonl", '{"sentence": "fine", "label": 1}\n\n{"sentence": "bad"}\n',
                         ["train.jsonl, line 3, field 'label'", "no 'label' key", "fix:"]),
    "json not an object": ("train.jsonl", '["fine", 1]\n', ["train.jsonl, line 1", "not an object", "fix:"]),
    "tab in a value": ("train.tsv", "sentence\tlabel\nfine\t1\nso\tbad\t0\n",
                       ["train.tsv, line 3", "has 3 tab-separated fields, the header has 2", "fix:"]),
    "empty text": ("train.tsv", "sentence\tlabel\n \t1\n", ["train.tsv, line 2, field 'sentence'", "is empty", "fix:"]),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN))
def test_each_bad_training_file_is_one_line_before_the_model_loads(case, tmp_path, capsys):
    name, content, says = BAD_TRAIN[case]
    train_file = write(tmp_path / name, content)
    dev_file = write(tmp_path / "dev.tsv", GOOD_DEV)
    line = cli_error(capsys, tmp_path, "--train-file", str(train_file), "--dev-file", str(dev_file))
    for s in says:
        assert s in line, (s, line)


def test_a_missing_file_is_named_with_its_flag(tmp_path, capsys):
    line = cli_error(capsys, tmp_path, "--train-file", str(tmp_path / "nope.tsv"))
    assert f"{tmp_path / 'nope.tsv'}: no such file; fix: give an existing file to --train-file" in line


def test_an_empty_dev_file_is_an_error_not_a_division_by_zero(tmp_path, capsys):
    train_file = write(tmp_path / "train.tsv", GOOD_DEV)
    dev_file = write(tmp_path / "dev.tsv", "")
    line = cli_error(capsys, tmp_path, "--train-file", str(train_file), "--dev-file", str(dev_file))
    assert "dev.tsv: is empty" in line
    # ... and not evaluating needs no dev file at all
    cfg = EdgeConfig.of(model="tiny-llama", train_file=str(train_file), dev_file=str(dev_file), eval_before=False,
                        eval_after=False)
    assert check_data(cfg).name == "sst2"


def test_debug_shows_the_traceback(tmp_path):
    train_file = write(tmp_path / "train.tsv", "sentence\tlabel\nfine\t-1\n")
    with pytest.raises(T.DataError) as e:
        main(["--debug", "edge", "train", "--model", str(tmp_path / "no-such-model"), "--train-file", str(train_file)])
    assert (e.value.path.name, e.value.line, e.value.field) == ("train.tsv", 2, "label")


def test_the_library_raises_the_same_error_before_loading(tmp_path):
    """train() checks first too: a nonexistent model and no cloud, and still the data error."""
    train_file = write(tmp_path / "train.tsv", "sentence\tlabel\n")
    cfg = EdgeConfig.of(cloud="127.0.0.1:9", model=str(tmp_path / "no-such-model"), train_file=str(train_file),
                        progress=False)
    with pytest.raises(T.DataError, match="header but no examples"):
        train(cfg)


def test_labels_may_be_numbers_or_names_in_any_case(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "a", "label": "Positive"}\n{"text": "b", "label": 0}\n'
                                    '{"text": "c", "label": "1"}\n{"text": "d", "label": "negative"}\n')
    rows = T.load_split("sst2", "train", f)
    assert [r["label"] for r in rows] == [1, 0, 1, 0] and rows[0]["sentence"] == "a"
    ag = write(tmp_path / "ag.tsv", "text\tlabel\nx\tSci/Tech\ny\tsports\n")
    assert [r["label"] for r in T.load_split("agnews", "train", ag)] == [3, 1]
    for bad in ("true", "1.5", "-1", "2"):
        with pytest.raises(T.DataError):
            T.load_split("sst2", "train", write(tmp_path / "b.jsonl", f'{{"text": "a", "label": {bad}}}\n'))


def test_an_over_long_example_is_cut_at_its_start_and_said_once(caplog):
    task, tok = T.TASKS["sst2"], T.tiny_tokenizer()
    rows = [{"sentence": "x" * 100_000, "label": 1}, {"sentence": "short", "label": 0},
            {"sentence": "y" * 500, "label": 0}]
    with caplog.at_level(logging.WARNING, logger="tandem.data"):
        items = T.encode(task, rows, tok, source="train.tsv")
    warnings = [r.getMessage() for r in caplog.records if r.name == "tandem.data"]
    assert warnings == ["train.tsv: 2 of 3 examples are longer than 96 tokens (the task's max_len); their start is "
                        "cut, the end of the prompt and the answer position are kept"]
    tail = tok("\nAnswer:")["input_ids"]
    assert len(items[0]["ids"]) == 96 and items[0]["ids"][-len(tail):] == tail  # the answer position is kept


# ------------------------------------------------------------------------------------------------ custom tasks

INTENT = {"name": "intent", "prompt": "Message: {text}\nIs this a greeting, a farewell or a question?\nAnswer: ",
          "labels": {"hi": "greeting", "bye": "farewell", "ask": "question"}, "max_len": 64}
TRAIN_ROWS = [("hello there", "hi"), ("good morning", 0), ("hi friend", "HI"), ("bye now", "bye"),
              ("see you later", 1), ("farewell all", "bye"), ("where is it?", "ask"), ("what time is it?", 2),
              ("how are you?", "ask")]
DEV_ROWS = [("hello you", 0), ("bye bye", 1), ("why?", 2), ("hi hi", "hi"), ("so long", "bye"), ("who?", "ask")]


def intent_files(tmp_path, task=None):
    task_file = write(tmp_path / "intent.json", json.dumps(task or INTENT))
    train_file = write(tmp_path / "train.jsonl", "".join(json.dumps({"text": t, "label": y}) + "\n"
                                                         for t, y in TRAIN_ROWS))
    dev_file = write(tmp_path / "dev.tsv", "text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in DEV_ROWS))
    return task_file, train_file, dev_file


def test_a_custom_three_class_task_trains_and_evaluates(cloud, tiny, tmp_path):
    task_file, train_file, dev_file = intent_files(tmp_path)
    cfg = EdgeConfig.of(cloud=cloud.address, token=TOKENS["alice"], model="tiny-llama", progress=False,
                        task_file=str(task_file), train_file=str(train_file), dev_file=str(dev_file), steps=6,
                        batch_size=3, lr=5e-3, cloud_lora="edge")
    task = check_data(cfg)
    assert (task.name, task.num_classes, task.label_names) == ("intent", 3, ["hi", "bye", "ask"])
    tok = T.tiny_tokenizer()
    assert [it["label"] for it in load_items(cfg, tok, "train")] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(set(T.label_token_ids(task, tok))) == 3
    metrics = train(cfg, loaded=copy.deepcopy(tiny)).metrics
    for when in ("eval_before", "eval_after"):
        assert metrics[when]["examples"] == len(DEV_ROWS) and 0.0 <= metrics[when]["accuracy"] <= 1.0
    assert metrics["summary"]["steps"] == 6 and metrics["config"]["data"]["task_file"] == str(task_file)


def test_the_cli_trains_a_custom_task(cloud, tmp_path, capsys):
    task_file, train_file, dev_file = intent_files(tmp_path)
    main(["edge", "train", "--cloud", cloud.address, "--token", TOKENS["alice"], "--model", "tiny-llama",
          "--no-progress", "--steps", "2", "--batch-size", "3", "--task-file", str(task_file), "--train-file",
          str(train_file), "--dev-file", str(dev_file), "--metrics-out", str(tmp_path / "m.json")])
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["eval_after"]["examples"] == len(DEV_ROWS)


BAD_TASKS = {
    "not json": ('{"prompt": "x {text}",\n "labels": [a]}', ["intent.json, line 2", "not valid JSON", "fix:"]),
    "unknown key": ({**INTENT, "label": []}, ["field 'label'", "unknown key", "fix: use only the keys"]),
    "no field": ({**INTENT, "prompt": "Answer:"}, ["field 'prompt'", "uses no field", "fix:"]),
    "bad template": ({**INTENT, "prompt": "Message: {text"}, ["field 'prompt'", "not a valid template", "fix:"]),
    "one label": ({**INTENT, "labels": ["only"]}, ["field 'labels'", "two or more", "fix:"]),
    "same word": ({**INTENT, "labels": ["yes", "no", "Yes "]}, ["field 'labels'", "both", "fix:"]),
    "text_fields": ({**INTENT, "text_fields": ["sentence"]}, ["field 'text_fields'", "{text}", "fix:"]),
}


@pytest.mark.parametrize("case", list(BAD_TASKS))
def test_each_bad_task_file_is_one_line(case, tmp_path, capsys):
    spec, says = BAD_TASKS[case]
    task_file, train_file, dev_file = intent_files(tmp_path)
    write(task_file, spec if isinstance(spec, str) else json.dumps(spec))
    line = cli_error(capsys, tmp_path, "--task-file", str(task_file), "--train-file", str(train_file),
                     "--dev-file", str(dev_file))
    assert "intent.json" in line
    for s in says:
        assert s in line, (s, line)


def test_an_unknown_label_of_a_custom_task_is_an_error_never_a_class(tmp_path, capsys):
    task_file, train_file, dev_file = intent_files(tmp_path)
    write(dev_file, "text\tlabel\nhello\thi\nwhat\tquestion?\n")
    line = cli_error(capsys, tmp_path, "--task-file", str(task_file), "--train-file", str(train_file),
                     "--dev-file", str(dev_file))
    assert "dev.tsv, line 3, field 'label': 'question?' is not a label of intent" in line
    assert "fix: use a class number 0..2 or a label name (hi, bye, ask)" in line


def test_a_custom_task_needs_its_own_data(tmp_path, capsys):
    task_file, _, _ = intent_files(tmp_path)
    line = cli_error(capsys, tmp_path, "--task-file", str(task_file))
    assert "has no shared data" in line and "--train-file" in line


def test_label_words_whose_first_tokens_collide_are_refused_before_a_session(tmp_path, capsys):
    """The tokenizer-level check runs after the (tiny) model loads but before any cloud is asked (none runs)."""
    task_file, train_file, dev_file = intent_files(tmp_path, {**INTENT, "prompt": "Message: {text}\nAnswer:"})
    line = cli_error(capsys, tmp_path, "--task-file", str(task_file), "--train-file", str(train_file),
                     "--dev-file", str(dev_file), model="tiny-llama")
    # no trailing space in the prompt: each word gets a leading one, and the character tokenizer starts all with " "
    assert "intent.json, field 'labels': label words ' greeting' and ' farewell' start with the same token" in line


def test_a_prompt_end_longer_than_max_len_is_refused(tmp_path, capsys):
    task_file, train_file, dev_file = intent_files(tmp_path, {**INTENT, "max_len": 20})
    line = cli_error(capsys, tmp_path, "--task-file", str(task_file), "--train-file", str(train_file),
                     "--dev-file", str(dev_file), model="tiny-llama")
    assert "field 'max_len'" in line and "would cut the question and the answer position" in line
