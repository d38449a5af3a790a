"""Web demo: the request function against predict(), and the real page in a headless Chromium."""
from __future__ import annotations

import io
import shutil
import socket
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import NAMES, rand_image


@pytest.fixture(scope="module")
def model(make_tiny_detector, tmp_path_factory):
    m = make_tiny_detector(128, 192, 10)
    return m.set_vocabulary(NAMES, cache_dir=tmp_path_factory.mktemp("serve_cache")).eval()


def test_detect_image_matches_predict(model):
    from gridclip.engine.predict import draw_detections, predict
    from gridclip.serve import detect_image

    img = rand_image()
    drawn, rows = detect_image(model, img, "", 0.06)
    (ref,) = predict(model, img, score_thresh=0.06)
    assert len(rows) == len(ref["scores"]) > 0
    assert [r[0] for r in rows] == ref["names"]
    np.testing.assert_allclose([r[2:] for r in rows], ref["boxes"].numpy(), atol=0.05)
    expected = draw_detections(torch.from_numpy(img).permute(2, 0, 1).contiguous(), ref).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(drawn, expected)
    assert model.class_names == tuple(NAMES)  # an empty vocabulary box keeps the model's


def test_detect_image_new_vocabulary_and_errors(model):
    from gridclip.serve import detect_image

    _, rows = detect_image(model, rand_image(), "cat, dog", 0.0)
    assert rows and {r[0] for r in rows} <= {"cat", "dog"}
    with pytest.raises(ValueError, match="no image"):
        detect_image(model, None, "cat")
    with pytest.raises(ValueError, match="duplicate"):
        detect_image(model, rand_image(), "cat, Cat")
    with pytest.raises(ValueError, match="files are not read"):
        detect_image(model, rand_image(), "/etc/names.txt")
    model.set_vocabulary(NAMES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                "--disable-dev-shm-usage", "--window-size=1280,1000"]


@pytest.mark.browser
def test_page_in_headless_chromium(model, tmp_path):
    """Upload an image, type a vocabulary, press Detect: the drawn image and the table appear, and the
    served image is exactly what detect_image draws."""
    pytest.importorskip("gradio", reason="gradio not installed (pip install 'gridclip[serve]')")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium / chromedriver not installed (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from gridclip.serve import build_demo, detect_image

    img = rand_image(80, 100, 3)
    Image.fromarray(img).save(tmp_path / "upload.png")
    port = _free_port()
    demo = build_demo(model, default_score=0.06)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'chrome-profile'}"]:
        options.add_argument(flag)
    browser = None
    try:
        browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 90)
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#input-image input[type=file]")).send_keys(
            str(tmp_path / "upload.png"))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#input-image img"))  # upload shown
        box = browser.find_element(By.CSS_SELECTOR, "#vocabulary textarea")
        box.clear()
        box.send_keys("cat, dog")
        browser.find_element(By.CSS_SELECTOR, "#detect-button").click()
        out = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#output-image img"))
        src = out[0].get_attribute("src")
        wait.until(lambda b: "cat" in b.find_element(By.CSS_SELECTOR, "#detections").text
                   or "dog" in b.find_element(By.CSS_SELECTOR, "#detections").text)
        served = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(src, timeout=30).read())).convert("RGB"))
    finally:
        if browser is not None:
            browser.quit()
        demo.close()
    expected, rows = detect_image(model, img, "cat, dog", 0.06)
    assert rows
    np.testing.assert_array_equal(served, expected)
    assert not np.array_equal(served, img)  # boxes were drawn
