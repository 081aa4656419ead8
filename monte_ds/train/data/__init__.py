"""Training data: load a local file, a saved dataset, a hub dataset or a bundled file, check every
row, and put it in one of the forms TRL's SFTTrainer tokenizes itself (`text`, `messages`,
`prompt`/`completion`).

One module per job, each importable from here:
- `sources`: where the rows come from, and the `data` section (`DataSection`, `training_dataset`);
- `formats`: the record layouts, told apart by their columns and converted (alpaca and "template"
  become prompt/completion pairs, ShareGPT `conversations` chat `messages`:
  `training.completion_only_loss`, TRL's default for pairs, then trains on the response only);
- `rows`: the row checks, and the bad rows raised or skipped (`data.on_bad_rows`), each named by
  file and `line N` / `row N`;
- `tokens`: the trainable-token check, after TRL's templating, masking and truncation.

Every problem is a `UserError` naming the key (and the file and row), raised before anything is written.
"""

from monte_ds.train.data.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    FORMATS,
    dataset_texts,
    detect_format,
)
from monte_ds.train.data.rows import ON_BAD_ROWS, Source
from monte_ds.train.data.sources import (
    BUNDLED_PREFIX,
    DATA_SUFFIXES,
    DataSection,
    bundled_path,
    load_source,
    load_training_data,
    prepare_dataset,
    split_eval,
    training_dataset,
)
from monte_ds.train.data.tokens import check_trainable_tokens


__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "BUNDLED_PREFIX",
    "DATA_SUFFIXES",
    "FORMATS",
    "ON_BAD_ROWS",
    "DataSection",
    "Source",
    "bundled_path",
    "check_trainable_tokens",
    "dataset_texts",
    "detect_format",
    "load_source",
    "load_training_data",
    "prepare_dataset",
    "split_eval",
    "training_dataset",
]
