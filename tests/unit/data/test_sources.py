import numpy as np
import pytest

from megatron_gr.data import (
    DataFormatError, RawEvents, build_sequences, infer_source, load_events, load_sequences,
    resolve_source, save_prepared,
)

U_DATA = "3\t30\t4\t300\n1\t10\t5\t100\n3\t20\t2\t200\n"


def test_load_sequences_reads_raw_files_and_prepared_directories_alike(tmp_path):
    (tmp_path / "u.data").write_text(U_DATA)
    from_raw = load_sequences(tmp_path)
    assert from_raw.user_ids.tolist() == [1, 3]
    assert from_raw.item_vocab[from_raw.item_ids].tolist() == [10, 20, 30]
    save_prepared(from_raw, tmp_path / "prepared", source="test")
    from_prepared = load_sequences(tmp_path / "prepared")
    assert isinstance(from_prepared.item_ids, np.memmap)
    for name in ("user_ids", "offsets", "item_ids", "timestamps", "ratings", "item_vocab"):
        np.testing.assert_array_equal(getattr(from_prepared, name), getattr(from_raw, name))


def test_load_events_names_the_known_formats(tmp_path):
    with pytest.raises(ValueError, match="unknown raw data format 'parquet'.*ml-25m"):
        load_events("parquet", tmp_path)
    (tmp_path / "data.txt").write_text(U_DATA)
    assert load_events("ml-100k", tmp_path / "data.txt").users.tolist() == [3, 1, 3]


def test_build_sequences_rejects_an_empty_source():
    empty = np.zeros(0, dtype=np.int64)
    with pytest.raises(DataFormatError, match="no events"):
        build_sequences(RawEvents(empty, empty, empty, empty.astype(np.float32)))


@pytest.mark.parametrize("layout", ["u.data", "ratings.dat", "ratings.csv"])
def test_a_movielens_file_or_its_directory_is_movielens(tmp_path, layout):
    (tmp_path / layout).write_text("")
    assert infer_source(tmp_path) == "movielens"
    assert infer_source(tmp_path / layout) == "movielens"
    assert resolve_source("auto", tmp_path / layout) == "movielens"


def test_a_prepared_directory_is_prepared_even_beside_a_ratings_file(tmp_path):
    (tmp_path / "u.data").write_text(U_DATA)
    directory = save_prepared(load_sequences(tmp_path), tmp_path / "prepared", source="test")
    (directory / "u.data").write_text(U_DATA)
    assert infer_source(directory) == "prepared"


def test_auto_is_synthetic_only_without_a_path_and_explicit_sources_stand(tmp_path):
    assert resolve_source("auto", None) == "synthetic"
    assert resolve_source("movielens", tmp_path / "anything") == "movielens"
    assert resolve_source("synthetic", None) == "synthetic"


@pytest.mark.parametrize("name", ["ratings.txt", "data"])
def test_a_path_of_unknown_data_names_itself_and_what_was_looked_for(tmp_path, name):
    path = tmp_path / name
    if name == "data":
        path.mkdir()
        (path / "notes.txt").write_text("x")
    else:
        path.write_text(U_DATA)
    with pytest.raises(DataFormatError) as caught:
        resolve_source("auto", path)
    message = str(caught.value)
    assert "\n" not in message
    for word in (str(path), "u.data", "ratings.dat", "ratings.csv", "manifest.json"):
        assert word in message


def test_a_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'} does not exist"):
        infer_source(tmp_path / "nowhere")
