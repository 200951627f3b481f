#!/usr/bin/env python3
"""SASRec baseline on MovieLens-100K, trained with RecBole, evaluated on OUR split and protocol.

RecBole is NOT a dependency of megatron_gr: it lives in its own virtualenv, outside the repo
(``$RECBOLE_VENV`` below; any directory, e.g. ``../venv-recbole`` beside the checkout).
Setup (Python 3.11, CPU; install the CPU torch FIRST so pip does not pull CUDA wheels)::

    RECBOLE_VENV=../venv-recbole
    python3 -m venv $RECBOLE_VENV
    $RECBOLE_VENV/bin/pip install --upgrade pip
    $RECBOLE_VENV/bin/pip install torch==2.13.0
    $RECBOLE_VENV/bin/pip install recbole==1.2.1

(RecBole 1.2.1 pulls numpy 2.x / pandas 3.x. No RecBole file is patched; at import time this
script restores the numpy aliases ``np.float_``, ``np.complex_``, ``np.unicode_`` (removed in numpy
2, read by RecBole's ``Config.compatibility_settings``), replaces RecBole's TensorBoard writer by a
no-op (it would create ./log_tensorboard) and silences pandas-3 chained-assignment warnings.)

Run (from the repository root; the data directory is --data-dir, else $MEGATRON_GR_ML100K, else
../shared/data/ml-100k beside the checkout, and must hold u.data; results go to --out, default
runs/sasrec_ml100k/)::

    # verify the split on both sides (prints users' sequences/targets), no training
    $RECBOLE_VENV/bin/python tools/benchmarks/sasrec_recbole.py --verify-only
    # search: SEARCH_CONFIGS (or --configs JSON, or --full-grid), 2 runs at a time -> search.json
    $RECBOLE_VENV/bin/python tools/benchmarks/sasrec_recbole.py --search --jobs 2
    # one config, several seeds (mean/std) -> final.json
    $RECBOLE_VENV/bin/python tools/benchmarks/sasrec_recbole.py \\
        --hidden 64 --layers 2 --heads 2 --dropout 0.5 --lr 1e-3 --seeds 2020 2021 2022 --jobs 2

See docs/benchmarks/ml100k_sasrec_baseline.md for the results.

How the split is kept identical to ours
---------------------------------------
* The split is built by ``megatron_gr.data.sequences`` (``RawEvents`` -> ``UserSequences.from_events``
  -> ``LeaveOneOutSplit.build``): stable time sort per user, last event = test target, second last =
  validation target, the rest = training.
* RecBole only ever sees the TRAINING events: we write them as an atomic ``.inter`` file whose
  timestamp column is the event's position in the user's sequence (0, 1, 2, ...), so RecBole's own
  (uid, timestamp) sort cannot reorder ties; an ``.item`` file lists all items so RecBole's item
  vocabulary holds every item (1682 + padding). RecBole's split (``eval_args``) is never used.
* RecBole's SASRec network is trained by RecBole's ``Trainer`` (its Adam, epoch loop, early
  stopping); only ``_valid_epoch`` is replaced by our evaluator, and the best-validation weights
  are kept in memory instead of on disk.
* Training objective (``--objective``): ``all`` (default) = loss at every position of windows of
  <= 201 training events (``SASRecAllPositions``, ``build_windows``); it yields the same
  (prefix -> next item) losses as RecBole's stock data augmentation (checked numerically by
  ``verify_objective``) at ~1/75 of the cost. ``last`` = RecBole's stock pipeline (one length-200
  forward pass per training event: 4-17 min per epoch on a 2-core CPU).
* Validation/test scores come from the trained model's ``full_sort_predict`` on our own inputs
  (most recent <= 200 events before the target); metrics are computed here with numpy over ALL
  items, with NO masking of already-seen items (RecBole's history masking is never applied).

Metrics: rank = #items with a strictly higher score than the target + 0.5 * #other items with an
equal score; HR@K = [rank < K]; NDCG@K = 1/log2(rank + 2) if rank < K else 0; MRR = 1/(rank + 1);
K in {10, 50, 200}; averaged over all users.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from megatron_gr.data.sequences import LeaveOneOutSplit, RawEvents, UserSequences  # noqa: E402

DATA_ENV = "MEGATRON_GR_ML100K"
# Beside the checkout, as the tests look for it (tests/support/paths.py).
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "ml-100k"
MAX_SEQ_LEN = 200
KS = (10, 50, 200)
DATASET_NAME = "ml100k_loo"


# ----------------------------------------------------------------------------- split

def load_split(data_dir: str | os.PathLike | None = None) -> LeaveOneOutSplit:
    data_dir = Path(data_dir or os.environ.get(DATA_ENV, DEFAULT_DATA_DIR))
    raw = np.loadtxt(data_dir / "u.data", dtype=np.int64, delimiter="\t")
    events = RawEvents(
        users=raw[:, 0], items=raw[:, 1], timestamps=raw[:, 3], ratings=raw[:, 2].astype(np.float32)
    )
    return LeaveOneOutSplit.build(UserSequences.from_events(events))


def eval_inputs(split: LeaveOneOutSplit, which: str, max_len: int = MAX_SEQ_LEN):
    """Per-user input sequences (dense ids, most recent <= max_len events) and targets."""
    starts, ends = split.input_range(which)
    items = split.sequences.item_ids
    seqs = [items[max(s, e - max_len):e] for s, e in zip(starts, ends)]
    return seqs, split.targets(which)


def train_sequences(split: LeaveOneOutSplit):
    starts, ends = split.input_range("train")
    items = split.sequences.item_ids
    return [items[s:e] for s, e in zip(starts, ends)]


# ----------------------------------------------------------------------------- metrics

def ranks_from_scores(scores: np.ndarray, targets_col: np.ndarray) -> np.ndarray:
    """scores [B, I] over all items; targets_col [B] column index of the target. Ties count half."""
    t = scores[np.arange(scores.shape[0]), targets_col][:, None]
    higher = (scores > t).sum(axis=1)
    equal = (scores == t).sum(axis=1) - 1
    return higher + 0.5 * equal


def metrics_from_ranks(ranks: np.ndarray) -> dict:
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in KS:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    out["mrr"] = float((1.0 / (ranks + 1.0)).mean())
    return out


def _self_test_metrics():
    s = np.array([[0.1, 0.9, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    r = ranks_from_scores(s, np.array([2, 0]))
    assert np.allclose(r, [1.5, 1.5]), r
    m = metrics_from_ranks(np.array([0, 9, 10]))
    assert abs(m["hr@10"] - 2 / 3) < 1e-12 and abs(m["ndcg@10"] - (1 + 1 / np.log2(11)) / 3) < 1e-12


# ----------------------------------------------------------------------------- RecBole glue

def _import_recbole():
    # numpy-2 shim: RecBole 1.2.1's Config.compatibility_settings() does `np.float = np.float_`,
    # `np.complex = np.complex_`, `np.unicode = np.unicode_`; these three aliases were removed in
    # numpy 2.0, so we restore them (pure aliases, no behaviour change) before RecBole runs.
    for alias, target in (("float_", np.float64), ("complex_", np.complex128),
                          ("unicode_", np.str_)):
        if alias not in np.__dict__:
            setattr(np, alias, target)
    import warnings

    import pandas as pd
    # pandas>=3 (copy-on-write) makes RecBole's `feat[f].fillna(..., inplace=True)` a no-op and
    # warns; harmless here: our atomic files have no missing values (asserted in write_atomic_files)
    warnings.filterwarnings("ignore", category=pd.errors.ChainedAssignmentError)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    import torch
    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset
    from recbole.data.dataloader.general_dataloader import TrainDataLoader
    from recbole.data.interaction import Interaction
    from recbole.model.sequential_recommender.sasrec import SASRec
    from recbole.trainer import trainer as trainer_mod
    from recbole.utils import init_seed

    class _NullWriter:  # keep RecBole from writing ./log_tensorboard in the cwd
        def add_scalar(self, *a, **k):
            pass

        def add_hparams(self, *a, **k):
            pass

    trainer_mod.get_tensorboard = lambda logger: _NullWriter()
    return dict(torch=torch, recbole=recbole, Config=Config, create_dataset=create_dataset,
                TrainDataLoader=TrainDataLoader, Interaction=Interaction, SASRec=SASRec,
                Trainer=trainer_mod.Trainer, init_seed=init_seed)


def write_atomic_files(split: LeaveOneOutSplit, root: Path) -> Path:
    """Training events only; timestamp = position inside the user's sequence (no ties)."""
    d = root / DATASET_NAME
    d.mkdir(parents=True, exist_ok=True)
    user_ids = split.sequences.user_ids
    with open(d / f"{DATASET_NAME}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u, seq in zip(user_ids, train_sequences(split)):
            for j, it in enumerate(seq):
                f.write(f"{u}\t{it}\t{j}\n")
    with open(d / f"{DATASET_NAME}.item", "w") as f:
        f.write("item_id:token\n")
        for it in range(1, split.sequences.num_items + 1):
            f.write(f"{it}\n")
    return root


def recbole_config(rb, workdir: Path, cfg: dict, seed: int):
    loss = cfg["loss"]
    config_dict = {
        "data_path": str(workdir),
        "checkpoint_dir": str(workdir / "saved"),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]},
        "MAX_ITEM_LIST_LENGTH": MAX_SEQ_LEN,
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        # never used to split (we build the train loader from the whole dataset), but must be valid
        "eval_args": {"split": {"RS": [1.0, 0.0, 0.0]}, "order": "TO", "group_by": "user",
                      "mode": "full"},
        "metrics": ["NDCG"], "topk": [10], "valid_metric": "NDCG@10",
        "loss_type": loss,
        "train_neg_sample_args": None if loss == "CE" else {
            "distribution": "uniform", "sample_num": 1, "alpha": 1.0, "dynamic": False,
            "candidate_num": 0},
        "hidden_size": cfg["hidden"], "inner_size": cfg["hidden"] * cfg.get("inner_mult", 4),
        "n_layers": cfg["layers"], "n_heads": cfg["heads"],
        "hidden_dropout_prob": cfg["dropout"], "attn_dropout_prob": cfg["dropout"],
        "hidden_act": "gelu", "layer_norm_eps": 1e-12, "initializer_range": 0.02,
        "learning_rate": cfg["lr"], "weight_decay": cfg.get("weight_decay", 0.0),
        "train_batch_size": cfg["batch"], "epochs": cfg["max_epochs"],
        "stopping_step": cfg["patience"], "eval_step": cfg.get("eval_every", 1),
        "seed": seed, "reproducibility": True, "use_gpu": False, "device": "cpu",
        "show_progress": False, "log_wandb": False, "save_dataset": False,
        "save_dataloaders": False, "worker": 0,
    }
    return rb["Config"](model="SASRec", dataset=DATASET_NAME, config_dict=config_dict)


class Evaluator:
    """Full-corpus scoring of our valid/test inputs through model.full_sort_predict."""

    def __init__(self, rb, dataset, split: LeaveOneOutSplit, which: str, batch_size: int = 512):
        torch = rb["torch"]
        self.rb, self.which, self.batch_size = rb, which, batch_size
        tok2id = dataset.field2token_id["item_id"]
        n = split.sequences.num_items
        # RecBole internal id of each of our dense ids 1..n (index 0 unused)
        self.dense_to_rb = np.zeros(n + 1, dtype=np.int64)
        for d in range(1, n + 1):
            self.dense_to_rb[d] = tok2id[str(d)]
        seqs, targets = eval_inputs(split, which)
        self.seqs, self.targets = seqs, targets
        self.item_seq = torch.zeros(len(seqs), MAX_SEQ_LEN, dtype=torch.long)
        self.item_len = torch.zeros(len(seqs), dtype=torch.long)
        for i, s in enumerate(seqs):
            self.item_seq[i, :len(s)] = torch.from_numpy(self.dense_to_rb[s])
            self.item_len[i] = len(s)
        self.seq_field = dataset.item_id_list_field
        self.len_field = dataset.item_list_length_field
        self.cols = torch.from_numpy(self.dense_to_rb[1:])  # our item order, PAD column excluded

    def __bool__(self):
        return True

    def scores(self, model):
        torch = self.rb["torch"]
        model.eval()
        out = []
        with torch.no_grad():
            for b in range(0, len(self.seqs), self.batch_size):
                inter = self.rb["Interaction"]({
                    self.seq_field: self.item_seq[b:b + self.batch_size],
                    self.len_field: self.item_len[b:b + self.batch_size],
                })
                s = model.full_sort_predict(inter)  # [B, n_items incl. PAD]
                out.append(s[:, self.cols].float().numpy())
        return np.concatenate(out)  # [U, num_items], column j = our dense id j + 1

    def evaluate(self, model) -> dict:
        s = self.scores(model)
        return metrics_from_ranks(ranks_from_scores(s, self.targets - 1))


def make_all_positions_model_cls(rb):
    """RecBole's SASRec with the original SASRec objective: next-item loss at EVERY position.

    Same network, parameters, init and scoring (``full_sort_predict``) as RecBole's SASRec; only
    ``calculate_loss`` differs: instead of one (prefix -> next item) sample per forward pass
    (RecBole's data augmentation, which costs one length-200 forward pass per training event), one
    forward pass over a window gives the loss of every position. With a causal mask and positions
    counted from the window start, the output at position k of a window that starts at the
    user's first event is exactly RecBole's output for the prefix of length k + 1.
    """
    torch = rb["torch"]
    base = rb["SASRec"]

    class SASRecAllPositions(base):
        def forward_all(self, item_seq):  # RecBole SASRec.forward without the final gather
            position_ids = torch.arange(item_seq.size(1), dtype=torch.long, device=item_seq.device)
            position_ids = position_ids.unsqueeze(0).expand_as(item_seq)
            input_emb = self.item_embedding(item_seq) + self.position_embedding(position_ids)
            input_emb = self.dropout(self.LayerNorm(input_emb))
            mask = self.get_attention_mask(item_seq)
            return self.trm_encoder(input_emb, mask, output_all_encoded_layers=True)[-1]

        def calculate_loss(self, interaction):
            item_seq = interaction[self.ITEM_SEQ]  # [B, L] inputs (left-aligned, 0 = pad)
            targets = interaction["target_list"]  # [B, L] next item at each position
            weight = interaction["loss_mask"]  # [B, L] bool: positions whose target counts
            out = self.forward_all(item_seq)[weight]  # [T, H]
            pos = targets[weight]
            if self.loss_type == "CE":
                logits = out @ self.item_embedding.weight.t()  # full softmax over all items
                return self.loss_fct(logits, pos)
            neg = interaction["neg_list"][weight]  # BPR: one uniform negative per position
            pos_s = (out * self.item_embedding(pos)).sum(-1)
            neg_s = (out * self.item_embedding(neg)).sum(-1)
            return self.loss_fct(pos_s, neg_s)

    return SASRecAllPositions


def build_windows(seqs_rb: list[np.ndarray], max_len: int = MAX_SEQ_LEN, stride: int = 50):
    """Training windows of <= max_len + 1 events covering every training target exactly once.

    Users with <= max_len + 1 training events: one window from their first event, every target
    counted with its full prefix (== RecBole's samples). Longer users: the first window counts its
    max_len targets; each next window is shifted by <= ``stride`` events and counts only its new
    targets, so each target has >= max_len + 1 - stride events of context (RecBole: max_len).
    Returns inputs [W, max_len], targets [W, max_len], mask [W, max_len], user index [W].
    """
    rows = []
    for u, x in enumerate(seqs_rb):
        n = len(x)
        if n < 2:
            continue
        if n <= max_len + 1:
            rows.append((u, x, n - 1))
            continue
        end = max_len + 1
        rows.append((u, x[:end], max_len))
        while end < n:
            new_end = min(end + stride, n)
            rows.append((u, x[new_end - max_len - 1:new_end], new_end - end))
            end = new_end
    W = len(rows)
    inp = np.zeros((W, max_len), dtype=np.int64)
    tgt = np.zeros((W, max_len), dtype=np.int64)
    mask = np.zeros((W, max_len), dtype=bool)
    users = np.zeros(W, dtype=np.int64)
    for w, (u, x, n_counted) in enumerate(rows):
        m = len(x) - 1
        inp[w, :m] = x[:-1]
        tgt[w, :m] = x[1:]
        mask[w, m - n_counted:m] = True
        users[w] = u
    return inp, tgt, mask, users


def check_windows(seqs_rb, inp, tgt, mask, users, max_len=MAX_SEQ_LEN, stride=50):
    """Asserts: every training target (event index >= 1 of its user) is counted exactly once; each
    window is a contiguous slice of its user's sequence; a target at index t <= max_len sees its
    full prefix (as in RecBole's samples), a later one >= max_len + 1 - stride events."""
    counted = {}
    min_ctx_truncated = None
    for w in range(len(users)):
        x = seqs_rb[users[w]]
        m = int((inp[w] != 0).sum())
        window = np.append(inp[w, :m], tgt[w, m - 1])
        starts = [a for a in range(len(x) - m) if np.array_equal(x[a:a + m + 1], window)]
        assert starts, f"window {w} is not a slice of its user's sequence"
        start = starts[0]
        assert np.array_equal(tgt[w, :m], x[start + 1:start + m + 1])
        for j in np.flatnonzero(mask[w]):
            t, ctx = start + j + 1, j + 1
            if t <= max_len:
                assert start == 0 and ctx == t, (w, t)
            else:
                assert max_len + 1 - stride <= ctx <= max_len, (w, t, ctx)
                if start > 0:
                    min_ctx_truncated = int(ctx if min_ctx_truncated is None
                                            else min(min_ctx_truncated, ctx))
            key = (int(users[w]), t)
            assert key not in counted, key
            counted[key] = ctx
    expected = sum(max(len(x) - 1, 0) for x in seqs_rb)
    assert len(counted) == expected, (len(counted), expected)
    return {"targets": expected, "windows": int(len(users)),
            "min_context_beyond_first_window": min_ctx_truncated}


class WindowLoader:
    """Shuffled batches of training windows as RecBole Interactions (for RecBole's Trainer)."""

    def __init__(self, rb, dataset, windows, batch_size, seed, num_items_rb, bpr=False):
        self.rb, self.dataset, self._dataset = rb, dataset, dataset
        torch = rb["torch"]
        inp, tgt, mask, _ = windows
        self.inp, self.tgt = torch.from_numpy(inp), torch.from_numpy(tgt)
        self.mask = torch.from_numpy(mask)
        self.batch_size, self.bpr, self.n_items = batch_size, bpr, num_items_rb
        self.gen = torch.Generator().manual_seed(seed)
        self.seq_field = dataset.item_id_list_field
        self.shuffle = True

    def __len__(self):
        return (len(self.inp) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        torch = self.rb["torch"]
        perm = torch.randperm(len(self.inp), generator=self.gen)
        for b in range(0, len(perm), self.batch_size):
            idx = perm[b:b + self.batch_size]
            d = {self.seq_field: self.inp[idx], "target_list": self.tgt[idx],
                 "loss_mask": self.mask[idx]}
            if self.bpr:
                d["neg_list"] = torch.randint(1, self.n_items, self.inp[idx].shape,
                                              generator=self.gen)
            yield self.rb["Interaction"](d)


def make_trainer_cls(rb):
    base = rb["Trainer"]

    class OurProtocolTrainer(base):
        """RecBole Trainer; validation = our protocol; best weights kept in memory."""

        best_state = None
        history: list
        print_every = 0

        def _valid_epoch(self, valid_data, show_progress=False):
            res = valid_data.evaluate(self.model)
            self.history.append(res)
            if self.print_every and len(self.history) % self.print_every == 0:
                print(f"    eval {len(self.history)} (epoch {len(self.history) * self.eval_step}):"
                      f" valid ndcg@10={res['ndcg@10']:.4f} hr@10={res['hr@10']:.4f}", flush=True)
            return res["ndcg@10"], res

        def _save_checkpoint(self, epoch, verbose=True, **kwargs):
            self.best_state = copy.deepcopy(self.model.state_dict())
            self.best_epoch = epoch

    return OurProtocolTrainer


def build_dataset(rb, workdir: Path, cfg: dict, seed: int):
    config = recbole_config(rb, workdir, cfg, seed)
    rb["init_seed"](seed, True)
    dataset = rb["create_dataset"](config)
    dataset._change_feat_format()  # RecBole's data augmentation (prefix -> next item)
    return config, dataset


def verify(rb, split: LeaveOneOutSplit, dataset, n_show: int = 3, data_dir=None) -> dict:
    """Checks RecBole's training samples and our eval inputs against the split (and raw file)."""
    uid_tok = dataset.field2id_token["user_id"]
    iid_tok = dataset.field2id_token["item_id"]
    assert len(iid_tok) == split.sequences.num_items + 1, (len(iid_tok), split.sequences.num_items)
    inter = dataset.inter_feat
    users = inter["user_id"].numpy()
    lens = inter[dataset.item_list_length_field].numpy()
    seq = inter[dataset.item_id_list_field].numpy()
    tgt = inter["item_id"].numpy()
    train = dict(zip(split.sequences.user_ids.tolist(), train_sequences(split)))
    # RecBole's sample count per user must be n_train - 1; its longest sample (prefix + target)
    # must be the last <= MAX_SEQ_LEN + 1 training events, and ALL samples' targets in order
    # must be training events 2..n.
    n_checked = 0
    order = np.lexsort((np.arange(len(users)), users))
    users_s = users[order]
    bounds = np.flatnonzero(np.diff(users_s)) + 1
    for grp in np.split(order, bounds):
        u = int(uid_tok[users[grp[0]]])
        ours = train[u]
        theirs_targets = np.array([int(iid_tok[t]) for t in tgt[grp]])
        assert len(grp) == len(ours) - 1, (u, len(grp), len(ours))
        assert np.array_equal(theirs_targets, ours[1:]), u
        last = grp[-1]
        full = [int(iid_tok[x]) for x in seq[last, :lens[last]]] + [int(iid_tok[tgt[last]])]
        assert np.array_equal(np.array(full), ours[-(MAX_SEQ_LEN + 1):]), u
        n_checked += 1
    covered = set(int(uid_tok[x]) for x in np.unique(users))
    short = [u for u, s in train.items() if len(s) < 2]
    assert covered | set(short) == set(train), "users missing from RecBole's training data"

    # independent re-derivation of the split from the raw file (python stable sort)
    data_dir = Path(data_dir or os.environ.get(DATA_ENV, DEFAULT_DATA_DIR))
    raw = np.loadtxt(data_dir / "u.data", dtype=np.int64, delimiter="\t")
    by_user: dict[int, list] = {}
    for line_no, (u, i, _r, ts) in enumerate(raw.tolist()):
        by_user.setdefault(u, []).append((ts, line_no, i))
    vocab = split.sequences.item_vocab
    ev = Evaluator(rb, dataset, split, "valid")
    et = Evaluator(rb, dataset, split, "test")
    rb_to_dense = {int(r): d for d, r in enumerate(ev.dense_to_rb) if d > 0}
    for k, u in enumerate(split.sequences.user_ids.tolist()):
        raw_seq = [i for _ts, _ln, i in sorted(by_user[u])]  # sorts by (ts, line): stable
        for evaluator, cut in ((ev, 2), (et, 1)):
            inp = raw_seq[:len(raw_seq) - cut][-MAX_SEQ_LEN:]
            ours = vocab[evaluator.seqs[k]].tolist()
            fed = vocab[[rb_to_dense[int(x)] for x in evaluator.item_seq[k, :evaluator.item_len[k]]]]
            assert ours == inp and fed.tolist() == inp, (u, evaluator.which)
            assert int(vocab[evaluator.targets[k]]) == raw_seq[len(raw_seq) - cut], u
        assert vocab[train[u]].tolist() == raw_seq[:-2], u
    print(f"[verify] {n_checked} users: RecBole training samples == our training sequences; "
          f"valid/test inputs+targets (as fed to RecBole) == raw-file re-derivation for all "
          f"{split.sequences.num_users} users; RecBole item vocab = {len(iid_tok) - 1} items + PAD")
    for k in range(n_show):
        u = int(split.sequences.user_ids[k])
        ours = train[u]
        g = np.flatnonzero(users == dataset.field2token_id["user_id"][str(u)])
        last = g[-1]
        theirs = [int(iid_tok[x]) for x in seq[last, :lens[last]]] + [int(iid_tok[tgt[last]])]
        print(f"  user {u}: n_events={len(ours) + 2} train(ours, raw ids, last 8)="
              f"{vocab[ours[-8:]].tolist()} recbole(last 8)={vocab[theirs[-8:]].tolist()}")
        print(f"           valid input tail={vocab[ev.seqs[k][-5:]].tolist()} -> "
              f"{int(vocab[ev.targets[k]])}; test input tail={vocab[et.seqs[k][-5:]].tolist()} -> "
              f"{int(vocab[et.targets[k]])}")
    return {"users_checked": n_checked, "num_users": int(split.sequences.num_users),
            "num_items": int(split.sequences.num_items)}


def verify_objective(rb, split, config, dataset, n_users: int = 16) -> dict:
    """Numerical check that the all-positions loss equals RecBole's own SASRec loss on RecBole's
    own augmented samples (same model, eval mode so no dropout), for users whose training
    sequence fits one window (<= MAX_SEQ_LEN + 1 events): same targets, same contexts."""
    torch = rb["torch"]
    rb["init_seed"](0, True)
    model = make_all_positions_model_cls(rb)(config, dataset).eval()
    dense_to_rb = Evaluator(rb, dataset, split, "valid").dense_to_rb
    train = train_sequences(split)
    chosen = [u for u, x in enumerate(train) if 2 <= len(x) <= MAX_SEQ_LEN + 1][:n_users]
    # include the longest user that still fits one window
    fits = [u for u, x in enumerate(train) if len(x) <= MAX_SEQ_LEN + 1]
    chosen.append(max(fits, key=lambda u: len(train[u])))
    rb_uids = [dataset.field2token_id["user_id"][str(split.sequences.user_ids[u])] for u in chosen]
    rows = np.flatnonzero(np.isin(dataset.inter_feat["user_id"].numpy(), rb_uids))
    with torch.no_grad():
        stock = rb["SASRec"].calculate_loss(model, dataset.inter_feat[torch.from_numpy(rows)])
        inp, tgt, mask, _ = build_windows([dense_to_rb[train[u]] for u in chosen])
        ours = model.calculate_loss(rb["Interaction"]({
            dataset.item_id_list_field: torch.from_numpy(inp), "target_list": torch.from_numpy(tgt),
            "loss_mask": torch.from_numpy(mask)}))
    assert int(mask.sum()) == len(rows), (int(mask.sum()), len(rows))
    assert abs(float(stock) - float(ours)) < 1e-4 * max(1.0, abs(float(stock))), (stock, ours)
    print(f"[verify] objective: RecBole SASRec.calculate_loss on its {len(rows)} augmented samples "
          f"of {len(chosen)} users = {float(stock):.6f}; all-positions loss on their windows = "
          f"{float(ours):.6f}")
    return {"users": len(chosen), "samples": int(len(rows)), "recbole_loss": float(stock),
            "all_positions_loss": float(ours)}


def run_one(rb, split, workdir: Path, cfg: dict, seed: int, verbose: bool = True,
            print_every: int = 0) -> dict:
    t0, c0 = time.time(), time.process_time()
    config, dataset = build_dataset(rb, workdir, cfg, seed)
    valid = Evaluator(rb, dataset, split, "valid")
    test = Evaluator(rb, dataset, split, "test")
    rb["init_seed"](seed, True)
    info = {}
    if cfg["objective"] == "last":  # RecBole's stock pipeline: augmented prefixes, last position
        sampler = None
        if cfg["loss"] != "CE":
            from recbole.sampler import Sampler
            sampler = Sampler(["train"], [dataset]).set_phase("train")
        train_loader = rb["TrainDataLoader"](config, dataset, sampler, shuffle=True)
        model = rb["SASRec"](config, dataset)
    else:
        seqs_rb = [valid.dense_to_rb[x] for x in train_sequences(split)]
        windows = build_windows(seqs_rb, MAX_SEQ_LEN, cfg["stride"])
        info = check_windows(seqs_rb, *windows, max_len=MAX_SEQ_LEN, stride=cfg["stride"])
        train_loader = WindowLoader(rb, dataset, windows, cfg["batch"], seed,
                                    dataset.num("item_id"), bpr=cfg["loss"] == "BPR")
        model = make_all_positions_model_cls(rb)(config, dataset)
    trainer = make_trainer_cls(rb)(config, model)
    trainer.history = []
    trainer.print_every = print_every
    trainer.fit(train_loader, valid, verbose=False, saved=True, show_progress=False)
    model.load_state_dict(trainer.best_state)
    best_valid = valid.evaluate(model)
    best_test = test.evaluate(model)
    wall = time.time() - t0
    res = {"config": cfg, "seed": seed, "best_epoch": int(trainer.best_epoch) + 1,  # 1-based
           "epochs_run": len(trainer.history) * trainer.eval_step,
           "evals_run": len(trainer.history), "valid": best_valid, "test": best_test,
           "wall_s": round(wall, 1), "cpu_s": round(time.process_time() - c0, 1),
           "train_windows": info,
           "valid_ndcg10_curve": [round(h["ndcg@10"], 5) for h in trainer.history]}
    if verbose:
        print(f"[run] {cfg_str(cfg)} seed={seed} best_epoch={res['best_epoch']}/"
              f"{res['epochs_run']} valid ndcg@10={best_valid['ndcg@10']:.4f} "
              f"hr@10={best_valid['hr@10']:.4f} | test ndcg@10={best_test['ndcg@10']:.4f} "
              f"hr@10={best_test['hr@10']:.4f} | {wall:.0f}s", flush=True)
    return res


def cfg_str(cfg):
    return (f"obj={cfg['objective']} loss={cfg['loss']} h={cfg['hidden']} L={cfg['layers']} H={cfg['heads']} "
            f"drop={cfg['dropout']} lr={cfg['lr']} bs={cfg['batch']}")


def summarize(runs: list[dict]) -> dict:
    out = {}
    for part in ("valid", "test"):
        keys = runs[0][part].keys()
        out[part] = {k: {"mean": float(np.mean([r[part][k] for r in runs])),
                         "std": float(np.std([r[part][k] for r in runs], ddof=1))
                         if len(runs) > 1 else 0.0} for k in keys}
    out["wall_s"] = {"mean": float(np.mean([r["wall_s"] for r in runs]))}
    out["best_epoch"] = [r["best_epoch"] for r in runs]
    return out


# Full factorial reference grid (--search --full-grid): 48 CE configs, ~5-10 min each on this
# box, i.e. far over budget; the default --search runs SEARCH_CONFIGS (one-factor-at-a-time
# around a base config) instead. Every entry overrides the command-line config.
SEARCH_GRID = {
    "hidden": [50, 64, 128],
    "layers": [1, 2],
    "heads": [1, 2],
    "dropout": [0.2, 0.5],
    "lr": [1e-3, 5e-4],
}
SEARCH_CONFIGS = [
    dict(hidden=64, layers=2, heads=1, dropout=0.5, lr=1e-3),  # base
    dict(hidden=64, layers=2, heads=1, dropout=0.2, lr=1e-3),
    dict(hidden=64, layers=1, heads=1, dropout=0.5, lr=1e-3),
    dict(hidden=64, layers=2, heads=2, dropout=0.5, lr=1e-3),
    dict(hidden=50, layers=2, heads=1, dropout=0.5, lr=1e-3),
    dict(hidden=128, layers=2, heads=2, dropout=0.5, lr=1e-3),
    dict(hidden=64, layers=2, heads=1, dropout=0.5, lr=5e-4),
    dict(hidden=128, layers=1, heads=1, dropout=0.5, lr=1e-3),
]

_WORKER: dict = {}


def _worker_run(cfg, seed, data_dir, threads):
    """One run in a pool process (own RecBole import, split and atomic files)."""
    if not _WORKER:
        rb = _import_recbole()
        rb["torch"].set_num_threads(threads)
        import logging
        logging.getLogger().setLevel(logging.WARNING)
        split = load_split(data_dir)
        tmp = tempfile.mkdtemp(prefix="sasrec_recbole_w_")
        _WORKER.update(rb=rb, split=split, workdir=write_atomic_files(split, Path(tmp)))
    return run_one(_WORKER["rb"], _WORKER["split"], _WORKER["workdir"], cfg, seed)


def run_many(jobs, cfgs_seeds, data_dir, threads, rb, split, workdir, on_result):
    if jobs <= 1:
        for cfg, seed in cfgs_seeds:
            on_result(run_one(rb, split, workdir, cfg, seed))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
        futs = [ex.submit(_worker_run, cfg, seed, data_dir, threads) for cfg, seed in cfgs_seeds]
        for f in as_completed(futs):
            on_result(f.result())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help=f"default: ${DATA_ENV} or ../shared/data/ml-100k beside the checkout")
    p.add_argument("--out", default=str(REPO_ROOT / "runs" / "sasrec_ml100k"))
    p.add_argument("--verify-only", action="store_true")
    p.add_argument("--search", action="store_true",
                   help="run SEARCH_CONFIGS (or --configs / --full-grid) for each of --seeds")
    p.add_argument("--configs", default=None,
                   help="JSON list of config overrides for --search, e.g. '[{\"lr\": 5e-4}]'")
    p.add_argument("--full-grid", action="store_true", help="--search over all of SEARCH_GRID")
    p.add_argument("--jobs", type=int, default=1, help="parallel runs (processes)")
    p.add_argument("--objective", default="all", choices=["all", "last"],
                   help="all: loss at every position of <=201-event windows (default); last: "
                        "RecBole's stock prefix augmentation (one length-200 pass per event)")
    p.add_argument("--stride", type=int, default=50, help="window shift for long users (all)")
    p.add_argument("--loss", default="CE", choices=["CE", "BPR"])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=64, help="windows (all) or samples (last)")
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=5,
                   help="early stopping: evaluations without a better valid NDCG@10")
    p.add_argument("--eval-every", type=int, default=2, help="epochs between validations")
    p.add_argument("--seeds", type=int, nargs="+", default=[2020])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (on a shared 2-core box, 2 OpenMP threads were "
                        "~8x slower than 1)")
    p.add_argument("--tag", default=None, help="output file name stem")
    args = p.parse_args(argv)
    sys.argv = sys.argv[:1]  # RecBole's Config also parses sys.argv (--key=value); keep it out

    _self_test_metrics()
    rb = _import_recbole()
    torch = rb["torch"]
    torch.set_num_threads(args.threads)
    import logging
    logging.getLogger().setLevel(logging.WARNING)
    split = load_split(args.data_dir)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = {"objective": args.objective, "stride": args.stride, "loss": args.loss,
            "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
            "dropout": args.dropout, "lr": args.lr, "batch": args.batch,
            "max_epochs": args.max_epochs, "patience": args.patience,
            "eval_every": args.eval_every}
    meta = {"recbole": rb["recbole"].__version__, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, {args.jobs} run(s) in "
                       f"parallel x {args.threads} torch thread(s), no GPU",
            "max_seq_len": MAX_SEQ_LEN, "tie_rule": "rank = #higher + 0.5 * #equal (others)",
            "num_users": int(split.sequences.num_users),
            "num_items": int(split.sequences.num_items), "argv": argv or ["python", *sys.orig_argv[1:]]}  # no interpreter path of this machine

    with tempfile.TemporaryDirectory(prefix="sasrec_recbole_") as tmp:
        workdir = write_atomic_files(split, Path(tmp))
        config, dataset = build_dataset(rb, workdir, base, args.seeds[0])
        meta["verify"] = verify(rb, split, dataset, data_dir=args.data_dir)
        meta["verify_objective"] = verify_objective(rb, split, config, dataset)
        del dataset
        if args.verify_only:
            return
        t_all = time.time()
        runs: list = []
        if args.search:
            tag = args.tag or "search"
            if args.full_grid:
                keys = list(SEARCH_GRID)
                overrides = [dict(zip(keys, v))
                             for v in itertools.product(*(SEARCH_GRID[k] for k in keys))]
            else:
                overrides = json.loads(args.configs) if args.configs else SEARCH_CONFIGS
            cfgs = [dict(base, **o) for o in overrides]
            cfgs = [c for c in cfgs if c["hidden"] % c["heads"] == 0]

            def on_result(r):
                runs.append(r)
                json.dump({"meta": meta, "runs": runs}, open(out_dir / f"{tag}.json", "w"),
                          indent=1)

            run_many(args.jobs, [(c, s) for c in cfgs for s in args.seeds], args.data_dir,
                     args.threads, rb, split, workdir, on_result)
            ranked = sorted(runs, key=lambda r: -r["valid"]["ndcg@10"])
            print("\n[search] configs by valid NDCG@10:")
            for r in ranked:
                print(f"  {cfg_str(r['config'])} seed={r['seed']} valid={r['valid']['ndcg@10']:.4f}"
                      f" test={r['test']['ndcg@10']:.4f} best_epoch={r['best_epoch']}"
                      f" {r['wall_s']}s")
        else:
            tag = args.tag or "final"
            run_many(args.jobs, [(base, s) for s in args.seeds], args.data_dir, args.threads,
                     rb, split, workdir, runs.append)
            runs.sort(key=lambda r: r["seed"])
            summ = summarize(runs)
            json.dump({"meta": meta, "runs": runs, "summary": summ},
                      open(out_dir / f"{tag}.json", "w"), indent=1)
            print(f"\n[final] {cfg_str(base)} seeds={args.seeds}")
            for part in ("valid", "test"):
                print(f"  {part}: " + "  ".join(
                    f"{k}={v['mean']:.4f}±{v['std']:.4f}" for k, v in summ[part].items()))
        print(f"[total] {time.time() - t_all:.0f}s; results in {out_dir / (tag + '.json')}")


if __name__ == "__main__":
    main()
