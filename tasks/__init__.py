"""Tasks: the public data sets, their prompts, users' own data and tasks, and batching. Everything here runs on the
data owner's side.

Classification tasks are instruction-style: the prompt ends where the answer starts, the label word's first token is
the answer token, the loss is cross-entropy of the next-token logits at the last prompt position, and accuracy
compares the logits of the label words only. WikiText-2 is plain language modelling (perplexity).

Data comes from `../shared/data` (or $TANDEM_DATA), or from any user file in the same shape: TSV/CSV with a header
naming a `sentence`/`text` column and a `label` column, or JSONL with the same keys (MRPC: `sentence1`,
`sentence2`); a label is a class number 0..n-1 or a label name. A user's own classification task comes from a JSON
task file (prompt, label words, see tasks/custom.py). Every user file is checked whole as it is read; what is wrong
is a DataError naming the file, line, field and the fix.

    builtin.py   Task, TASKS, data_root          files.py    reading and checking data files, load_split
    custom.py    task files, check_tokens       batching.py encode, Batch, batches, losses, tiny_tokenizer
    errors.py    DataError
"""
from tasks.batching import Batch, batches, collate, encode, label_token_ids, loss_from_hidden, tiny_tokenizer
from tasks.builtin import AGNEWS_LABELS, TASKS, Task, data_root
from tasks.custom import check_tokens, load_task_file, resolve_task
from tasks.errors import DataError
from tasks.files import check_split, label_of, load_file, load_split, read_rows, read_text

__all__ = ["AGNEWS_LABELS", "Batch", "DataError", "TASKS", "Task", "batches", "check_split", "check_tokens",
           "collate", "data_root", "encode", "label_of", "label_token_ids", "load_file", "load_split",
           "load_task_file", "loss_from_hidden", "read_rows", "read_text", "resolve_task", "tiny_tokenizer"]
