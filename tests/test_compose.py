"""compose.yaml runs exactly the commands the scale-out tests run, on settings that reach the
same database, Redis and storage from every tastebud service."""

from __future__ import annotations

import yaml

from tests.deployment import COMMANDS, ROOT


def test_compose_runs_the_tested_commands_on_shared_settings():
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert {"postgres", "redis"} | set(COMMANDS) == set(services)
    shared = ("DATABASE_URL", "REDIS_URL", "STORAGE_ROOT", "SECRET_KEY")
    for name, command in COMMANDS.items():
        service = services[name]
        assert service["command"] == command, name
        settings = service["environment"]
        assert all(f"TASTEBUD_{key}" in settings for key in shared), name
        assert settings["TASTEBUD_EMBEDDED_WORKER"] == "false"  # jobs run in the workers
        assert "storage:/data" in service["volumes"]
    assert services["web"]["environment"]["TASTEBUD_HOST"] == "0.0.0.0"
    assert "devices" in str(services["gpu-worker"]["deploy"])  # the GPU worker gets the GPU


def test_the_image_runs_what_the_services_run():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "'.[scale]'" in dockerfile  # the PostgreSQL and Redis clients
    assert 'CMD ["python", "app.py"]' in dockerfile
