def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs PyPI through pip; skipped where pip cannot download")
