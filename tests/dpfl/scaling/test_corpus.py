"""The offline stdlib corpus: tokenizer, determinism, user split, caps."""

import hashlib
import os

import numpy as np
import pytest

from dpfl.scaling import corpus


def test_tokenizer_round_trip():
  text = "def f(x):\n    return x  # ünïcode ✓\n"
  tokens = corpus.encode(text)
  assert tokens.dtype == np.int32 and tokens.max() < 256
  assert corpus.decode(np.concatenate([[corpus.BOS], tokens])) == text
  assert corpus.VOCAB_SIZE == corpus.BOS + 1 == 257
  with pytest.raises(ValueError, match="tokens must lie in"):
    corpus.decode([300])


def _fake_stdlib(root, seq_len):
  """40 files of distinct content, plus files that must be left out."""
  for i in range(40):
    sub = root / ("pkg" if i % 3 else "") / f"mod{i:02d}.py"
    sub.parent.mkdir(parents=True, exist_ok=True)
    sub.write_bytes(bytes((i * 7 + j) % 251 for j in range((i % 5 + 1) * seq_len + 3)))
  (root / "short.py").write_bytes(b"x" * (seq_len - 1))  # no full window: not a user
  for excluded in ("site-packages", "dist-packages", "__pycache__"):
    (root / excluded).mkdir()
    (root / excluded / "third_party.py").write_bytes(b"y" * 10 * seq_len)
  (root / "notes.txt").write_bytes(b"z" * 10 * seq_len)


def test_synthetic_root_split_caps_and_contents(tmp_path):
  seq_len, cap = 8, 3
  _fake_stdlib(tmp_path, seq_len)
  c = corpus.load_corpus(seq_len=seq_len, examples_per_user=cap, eval_fraction=0.3,
                         root=str(tmp_path))
  users = set(c.train_users) | set(c.eval_users)
  assert len(users) == 40 and not set(c.train_users) & set(c.eval_users)
  assert not any("packages" in u or "__pycache__" in u or u == "short.py" for u in users)
  for name in c.train_users:
    assert not corpus.is_eval_user(name, 0.3)
  for name in c.eval_users:
    # the rule, recomputed independently
    digest = hashlib.sha256(name.encode()).digest()
    assert int.from_bytes(digest[:8], "big") < 0.3 * 2**64
  assert list(c.train_users) == sorted(c.train_users)
  for split in ("train", "eval"):
    tokens = getattr(c, f"{split}_tokens")
    ids = getattr(c, f"{split}_user_ids")
    names = getattr(c, f"{split}_users")
    assert tokens.shape[1] == seq_len + 1 and (tokens[:, 0] == corpus.BOS).all()
    groups = c.examples_by_user(split)
    assert np.array_equal(np.concatenate(groups), np.arange(len(tokens)))
    for user, rows in enumerate(groups):
      assert 1 <= len(rows) <= cap and (ids[rows] == user).all()
      data = (tmp_path / names[user]).read_bytes()
      windows = {data[i:i + seq_len] for i in range(0, len(data) - seq_len + 1, seq_len)}
      for row in tokens[rows]:
        assert bytes(row[1:].astype(np.uint8)) in windows
      # evenly spread: first and last full window are both kept when capped
      if len(data) // seq_len > cap:
        assert bytes(tokens[rows[0], 1:].astype(np.uint8)) == data[:seq_len]
        last = (len(data) // seq_len - 1) * seq_len
        assert bytes(tokens[rows[-1], 1:].astype(np.uint8)) == data[last:last + seq_len]


def test_stdlib_corpus_is_deterministic_and_split_by_user():
  kwargs = dict(seq_len=32, examples_per_user=4, max_users=300)
  first = corpus.load_corpus(**kwargs)
  corpus._load.cache_clear()
  second = corpus.load_corpus(**kwargs)
  assert first is not second
  assert first.fingerprint == second.fingerprint
  for field in ("train_tokens", "train_user_ids", "eval_tokens", "eval_user_ids"):
    assert np.array_equal(getattr(first, field), getattr(second, field))
  assert first.train_users == second.train_users and first.eval_users == second.eval_users
  assert not set(first.train_users) & set(first.eval_users)
  assert len(first.train_users) + len(first.eval_users) == 300
  assert all(u.endswith(".py") and "site-packages" not in u for u in first.train_users)
  assert first.num_eval_examples > 0 and first.num_train_examples > 8 * first.num_eval_examples / 2
  other = corpus.load_corpus(seq_len=32, examples_per_user=5, max_users=300)
  assert other.fingerprint != first.fingerprint
  # The rows of a stdlib file really come from that file.
  path = os.path.join(first.source, first.train_users[0])
  with open(path, "rb") as f:
    data = f.read()
  assert bytes(first.train_tokens[0, 1:].astype(np.uint8)) == data[:32]


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=0), "seq_len"), (dict(examples_per_user=0), "examples_per_user"),
    (dict(eval_fraction=1.0), "eval_fraction"), (dict(max_users=0), "max_users"),
    (dict(max_users=1, eval_fraction=0.5), "split is empty"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    corpus.load_corpus(**kwargs)


def test_1024_token_windows_on_a_small_corpus(tmp_path):
  """--seq-len 1024 (the sweep's longest): windows of 1024 bytes, files shorter left out."""
  seq_len = 1024
  sizes = {f"f{i:02d}.py": size for i, size in enumerate(
      [1023, 1024, 2047, 2048, 5000, 100, 3 * 1024 + 1, 4096 * 3, 1500, 7000] * 3)}
  for name, size in sizes.items():
    (tmp_path / name).write_bytes(bytes((i * 31 + len(name)) % 256 for i in range(size)))
  c = corpus.load_corpus(seq_len=seq_len, examples_per_user=4, eval_fraction=0.3,
                         root=str(tmp_path))
  assert c.train_tokens.shape[1] == c.eval_tokens.shape[1] == seq_len + 1
  kept = {n: s for n, s in sizes.items() if s >= seq_len}
  assert set(c.train_users) | set(c.eval_users) == set(kept)
  for split in ("train", "eval"):
    tokens, names = getattr(c, f"{split}_tokens"), getattr(c, f"{split}_users")
    for user, rows in enumerate(c.examples_by_user(split)):
      data = (tmp_path / names[user]).read_bytes()
      count = len(data) // seq_len  # whole windows only, at most 4 kept, evenly spread
      starts = np.linspace(0, count - 1, 4).round().astype(int) if count > 4 else range(count)
      assert len(rows) == len(starts)
      for row, start in zip(tokens[rows], starts):
        assert row[0] == corpus.BOS
        assert bytes(row[1:].astype(np.uint8)) == data[start * seq_len:(start + 1) * seq_len]


def test_a_corpus_too_small_for_the_sequences_is_refused(tmp_path):
  for i in range(10):
    (tmp_path / f"m{i}.py").write_bytes(b"x" * (900 + i))
  (tmp_path / "long.py").write_bytes(b"y" * 1024)  # one user: one split stays empty
  with pytest.raises(ValueError, match=r"split is empty: no (train|eval) file holds one full "
                     r"window of seq_len=1024 bytes"):
    corpus.load_corpus(seq_len=1024, root=str(tmp_path))
  assert corpus.load_corpus(seq_len=512, root=str(tmp_path)).num_train_examples > 0


def test_models_read_1024_tokens():
  """The models' positions are sinusoidal: a 1024-token batch traces to a scalar loss."""
  import jax
  import jax.numpy as jnp
  from dpfl.scaling import models
  assert models.MAX_SEQ_LEN == 1024
  params = jax.eval_shape(lambda: models.init_params("s50k", jax.random.key(0), seq_len=1024))
  loss = jax.eval_shape(models.make_loss_fn("s50k"), params,
                        jax.ShapeDtypeStruct((2, 1025), jnp.int32))
  assert loss.shape == () and loss.dtype == jnp.float32
