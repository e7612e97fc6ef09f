"""k8s/register_stack.sh registers real ZenML stack components: every `component` call, with the
script's defaults, is a valid config of its ZenML flavor (no API server needed)."""
import re
import shlex

from zenml.cli.utils import parse_name_and_extra_arguments

from tests.test_k8s import K8S


def test_register_stack_components_are_valid_zenml_configs():
    """Each `component TYPE NAME FLAVOR --k=v ...` call, with the script's defaults, is a valid
    config of that ZenML flavor, and each secret it names is one the script creates."""
    from zenml.stack.flavor_registry import FlavorRegistry
    from zenml.utils import secret_utils

    text = (K8S / "register_stack.sh").read_text(encoding="utf-8")
    env = {k: re.sub(rf"^\$\{{{k}:-(.*)\}}$", r"\1", v)
           for k, v in re.findall(r'^(\w+)="(.*)"', text, re.M)}
    env.update(REGISTRY_URI="registry.example.com/ecomcap", KUBE_CONTEXT="ctx", SECRETS_DIR="/s")

    def calls(function):
        found = re.findall(rf"^{function} ((?:.*\\\n)*.*)$", text, re.M)
        expanded = []
        for call in found:
            for _ in range(3):  # defaults refer to other settings
                call = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], m[0]), call)
            expanded.append(shlex.split(call.replace("\\\n", " ")))
        return expanded

    secrets = {(name, pair.split("=")[1])
               for name, _, *pairs in calls("zenml_secret") for pair in pairs}
    registry = FlavorRegistry()
    flavors = {(f().type.value, f().name): f
               for f in registry.builtin_flavors + registry.integration_flavors}
    seen = set()
    for ctype, name, flavor, *args in calls("component"):
        key = (ctype.replace("-", "_"), flavor)
        _, config = parse_name_and_extra_arguments(args + [name], expand_args=False)
        config_class = flavors[key]().config_class
        assert set(config) <= set(config_class.model_fields), (key, config)
        for field, value in config.items():
            if secret_utils.is_secret_reference(value):  # resolving needs a store: check, stub
                ref = secret_utils.parse_secret_reference(value)
                assert (ref.name, ref.key) in secrets, value
                config[field] = "stub"
        if "authentication_secret" in config:  # an AWS-schema ZenML secret
            assert (config["authentication_secret"], "aws_secret_access_key") in secrets
        config_class(**config)
        seen.add(key[0])
    assert seen == {"artifact_store", "container_registry", "image_builder", "orchestrator",
                    "step_operator", "experiment_tracker", "model_registry"}
