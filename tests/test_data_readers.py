"""The on-disk readers against tiny fixture datasets written in each official layout."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from saga_train.data import DATASETS, DatasetError, ImageLoadError, load_dataset


def _image(path, color=(200, 30, 30), size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------- CUB
@pytest.fixture
def cub_root(tmp_path):
    """4 classes (ids 1-4), 2 images each; ids listed out of class order."""
    root = str(tmp_path / "CUB_200_2011")
    classes = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 3: "003.Sooty_Albatross",
               4: "004.Groove_billed_Ani"}
    images, labels = [], []
    image_id = 1
    for cid in (3, 1, 4, 2):
        for k in range(2):
            rel = f"{classes[cid]}/img_{cid}_{k}.jpg"
            _image(os.path.join(root, "images", rel), (cid * 50, 10, 10))
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cid}")
            image_id += 1
    _write(os.path.join(root, "images.txt"), images)
    _write(os.path.join(root, "image_class_labels.txt"), labels)
    _write(os.path.join(root, "classes.txt"), [f"{k} {v}" for k, v in classes.items()])
    return root


def test_cub_split_membership(cub_root):
    train = load_dataset("cub", cub_root, "train")
    test = load_dataset("cub", cub_root, "test")
    assert train.class_names == ["Black footed Albatross", "Laysan Albatross"]
    assert test.class_names == ["Sooty Albatross", "Groove billed Ani"]
    assert len(train) == 4 and len(test) == 4
    assert sorted(os.path.basename(p) for p in train.paths) == ["img_1_0.jpg", "img_1_1.jpg", "img_2_0.jpg",
                                                                "img_2_1.jpg"]
    assert [os.path.basename(p)[4] for p in test.paths] == ["3", "3", "4", "4"]
    assert test.labels == [0, 0, 1, 1]
    img, label = test[2]
    assert img.mode == "RGB" and img.size == (12, 10) and label == 1
    assert "2 classes, 4 images" in train.summary()


def test_cub_malformed_and_missing(cub_root):
    os.remove(os.path.join(cub_root, "classes.txt"))
    with pytest.raises(DatasetError, match=r"missing file .*classes.txt"):
        load_dataset("cub", cub_root, "train")
    with open(os.path.join(cub_root, "image_class_labels.txt"), "a") as f:
        f.write("9 x\n")
    with pytest.raises(DatasetError, match=r"image_class_labels.txt:9: expected an integer"):
        load_dataset("cub", cub_root, "train")


def test_missing_and_corrupt_image_named(cub_root):
    victim = os.path.join(cub_root, "images", "001.Black_footed_Albatross", "img_1_0.jpg")
    with open(victim, "wb") as f:
        f.write(b"not a jpeg at all")
    ds = load_dataset("cub", cub_root, "train")
    i = ds.paths.index(victim)
    with pytest.raises(ImageLoadError, match="img_1_0.jpg"):
        ds[i]
    os.remove(victim)
    with pytest.raises(DatasetError, match="missing image file .*img_1_0.jpg"):
        load_dataset("cub", cub_root, "train")


# ---------------------------------------------------------------- Cars
def _struct_array(rows):
    fields = list(rows[0])
    arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, r in enumerate(rows):
        for f in fields:
            arr[0, i][f] = r[f]
    return arr


def _cell(strings):
    return np.array(strings, dtype=object).reshape(1, -1)


CAR_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012", "BMW M3 Coupe 2012"]


def test_cars_annos_mat(tmp_path):
    root = str(tmp_path / "cars")
    rows = []
    for n, (cls, test_flag) in enumerate([(1, 0), (2, 1), (3, 0), (4, 1), (1, 1), (3, 1), (4, 0)], 1):
        rel = f"car_ims/{n:06d}.jpg"
        _image(os.path.join(root, rel))
        rows.append({"relative_im_path": rel, "bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 5, "bbox_y2": 5,
                     "class": np.uint8(cls), "test": np.uint8(test_flag)})
    savemat(os.path.join(root, "cars_annos.mat"), {"annotations": _struct_array(rows),
                                                   "class_names": _cell(CAR_NAMES)})
    train, test = load_dataset("cars", root, "train"), load_dataset("cars", root, "test")
    assert train.class_names == CAR_NAMES[:2] and test.class_names == CAR_NAMES[2:]
    # the official train/test flags are ignored: every image of classes 1-2 is train
    assert [os.path.basename(p) for p in train.paths] == ["000001.jpg", "000002.jpg", "000005.jpg"]
    assert train.labels == [0, 1, 0]
    assert [os.path.basename(p) for p in test.paths] == ["000003.jpg", "000004.jpg", "000006.jpg", "000007.jpg"]
    assert test.labels == [0, 1, 0, 1]
    assert len(load_dataset("cars", root, "all")) == 7

    rows[3]["class"] = np.uint8(9)
    savemat(os.path.join(root, "cars_annos.mat"), {"annotations": _struct_array(rows),
                                                   "class_names": _cell(CAR_NAMES)})
    with pytest.raises(DatasetError, match=r"class 9, outside 1..4"):
        load_dataset("cars", root, "train")
    for r in rows:
        del r["class"]
    savemat(os.path.join(root, "cars_annos.mat"), {"annotations": _struct_array(rows),
                                                   "class_names": _cell(CAR_NAMES)})
    with pytest.raises(DatasetError, match=r"cars_annos.mat: annotation 1 has no field 'class'"):
        load_dataset("cars", root, "train")


def test_cars_devkit_layout(tmp_path):
    root = str(tmp_path / "cars")
    for part, entries in (("train", [(1, "00001.jpg"), (3, "00002.jpg")]),
                          ("test", [(2, "00001.jpg"), (4, "00002.jpg"), (1, "00003.jpg")])):
        for _, fname in entries:
            _image(os.path.join(root, f"cars_{part}", fname))
        rows = [{"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 5, "bbox_y2": 5, "class": np.uint8(c), "fname": f}
                for c, f in entries]
        name = "devkit/cars_train_annos.mat" if part == "train" else "cars_test_annos_withlabels.mat"
        os.makedirs(os.path.join(root, "devkit"), exist_ok=True)
        savemat(os.path.join(root, name), {"annotations": _struct_array(rows)})
    with pytest.raises(DatasetError, match=r"missing file .*devkit.cars_meta.mat"):
        load_dataset("cars", root, "train")
    savemat(os.path.join(root, "devkit", "cars_meta.mat"), {"class_names": _cell(CAR_NAMES)})
    train, test = load_dataset("cars", root, "train"), load_dataset("cars", root, "test")
    assert [p.split(os.sep)[-2:] for p in train.paths] == [["cars_train", "00001.jpg"], ["cars_test", "00001.jpg"],
                                                           ["cars_test", "00003.jpg"]]
    assert train.labels == [0, 1, 0]
    assert [p.split(os.sep)[-2:] for p in test.paths] == [["cars_train", "00002.jpg"], ["cars_test", "00002.jpg"]]
    assert test.labels == [0, 1] and test.class_names == CAR_NAMES[2:]


def test_cars_nothing_there(tmp_path):
    with pytest.raises(DatasetError, match="cars_annos.mat"):
        load_dataset("cars", str(tmp_path), "train")


# ---------------------------------------------------------------- Aircraft
def test_aircraft_split_pool_and_banner(tmp_path):
    root = str(tmp_path / "fgvc-aircraft-2013b")
    data = os.path.join(root, "data")
    variants = ["A340-300", "707-320", "Falcon 2000", "737-200"]  # sorted: 707-320, 737-200 | A340-300, Falcon 2000
    _write(os.path.join(data, "variants.txt"), variants)
    _write(os.path.join(data, "images_variant_trainval.txt"), ["1000001 707-320", "1000002 Falcon 2000",
                                                               "1000003 A340-300"])
    _write(os.path.join(data, "images_variant_test.txt"), ["2000001 737-200", "2000002 Falcon 2000"])
    for i in ("1000001", "1000002", "1000003", "2000001", "2000002"):
        _image(os.path.join(data, "images", f"{i}.jpg"), size=(30, 50))
    train, test = load_dataset("aircraft", root, "train"), load_dataset("aircraft", root, "test")
    assert train.class_names == ["707-320", "737-200"] and test.class_names == ["A340-300", "Falcon 2000"]
    assert [os.path.basename(p) for p in train.paths] == ["1000001.jpg", "2000001.jpg"] and train.labels == [0, 1]
    assert [os.path.basename(p) for p in test.paths] == ["1000002.jpg", "1000003.jpg", "2000002.jpg"]
    assert test.labels == [1, 0, 1]
    assert train[0][0].size == (30, 30)  # 20-px banner cropped
    assert load_dataset("aircraft", root, "train", image_size=16)[0][0].size == (16, 16)

    with open(os.path.join(data, "images_variant_test.txt"), "a") as f:
        f.write("2000003 Boeing 999\n")
    with pytest.raises(DatasetError, match=r"image 2000003 has variant 'Boeing 999'"):
        load_dataset("aircraft", root, "train")
    os.remove(os.path.join(data, "images_variant_test.txt"))
    with pytest.raises(DatasetError, match=r"missing file .*images_variant_test.txt"):
        load_dataset("aircraft", root, "train")


# ---------------------------------------------------------------- iNaturalist
def test_inat_aves(tmp_path):
    root = str(tmp_path / "inat")
    cats = [{"id": 7, "name": "Turdus migratorius", "common_name": "American Robin", "supercategory": "Birds",
             "class": "Aves"},
            {"id": 2, "name": "Danaus plexippus", "supercategory": "Insects", "class": "Insecta"},
            {"id": 5, "name": "Cardinalis cardinalis", "common_name": "Northern Cardinal", "supercategory": "Birds",
             "class": "Aves"},
            {"id": 9, "name": "Pica pica", "supercategory": "Birds", "class": "Aves"},
            {"id": 3, "name": "Corvus corax", "common_name": "Common Raven", "supercategory": "Birds",
             "class": "Aves"}]
    images, anns = [], []
    for n, cid in enumerate([7, 2, 5, 9, 3, 5, 9], 1):
        fname = f"train_mini/{cid:05d}_x/{n}.jpg"
        _image(os.path.join(root, fname))
        images.append({"id": 100 + n, "file_name": fname})
        anns.append({"id": n, "image_id": 100 + n, "category_id": cid})
    with open(os.path.join(root, "train_mini.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    train, test = load_dataset("inat", root, "train"), load_dataset("inat_aves", root, "test")
    assert train.class_names == ["Common Raven", "Northern Cardinal"]  # ids 3, 5
    assert test.class_names == ["American Robin", "Pica pica"]  # ids 7, 9
    assert [os.path.basename(p) for p in train.paths] == ["3.jpg", "5.jpg", "6.jpg"] and train.labels == [1, 0, 1]
    assert [os.path.basename(p) for p in test.paths] == ["1.jpg", "4.jpg", "7.jpg"] and test.labels == [0, 1, 1]

    with open(os.path.join(root, "train_mini.json"), "w") as f:
        f.write('{"images": [\n  {"id": 1,\n  "file_name" "x.jpg"}]}')
    with pytest.raises(DatasetError, match=r"train_mini.json: not valid JSON.*: line 3"):
        load_dataset("inat", root, "train")


# ---------------------------------------------------------------- folder
def test_folder_ratio_split(tmp_path):
    root = tmp_path / "imgs"
    for c in ("delta", "alpha", "charlie", "bravo", "echo"):
        _image(str(root / c / "a.png"))
        _image(str(root / c / "sub" / "b.JPG"))
    (root / "alpha" / "notes.txt").write_text("not an image")
    train = load_dataset("folder", str(root), "train", ratio=0.6)
    test = load_dataset("folder", str(root), "test", ratio=0.6)
    assert train.class_names == ["alpha", "bravo", "charlie"] and test.class_names == ["delta", "echo"]
    assert len(train) == 6 and len(test) == 4 and test.labels == [0, 0, 1, 1]
    (root / "foxtrot").mkdir()
    with pytest.raises(DatasetError, match="foxtrot holds no image"):
        load_dataset("folder", str(root), "test", ratio=0.6)


def test_unknown_dataset_lists_known():
    with pytest.raises(ValueError, match="known: " + ", ".join(DATASETS)):
        load_dataset("imagenet", "/nowhere", "train")
