"""cluster.yaml through Ray's AWS bootstrap, against moto's in-process AWS mock (no network).

`ray up` resolves a cluster file in ``_bootstrap_config``: it fills each node
type's resources from EC2's instance-type data, validates the result, then
``bootstrap_aws`` creates (or finds) the head's IAM instance profile, the SSH
key pair, the subnets and the security group. Here all of that runs for real,
only the AWS endpoints are moto's.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
import yaml
from moto import mock_aws

REPO = Path(__file__).resolve().parent.parent
REGION = "us-west-2"


@pytest.fixture(scope="module")
def bootstrapped(tmp_path_factory) -> dict:
    """cluster.yaml as `ray up` resolves it, inside a fresh mocked AWS account."""
    import ray.autoscaler._private.aws.config as aws_config
    from ray.autoscaler._private.aws import utils as aws_utils
    from ray.autoscaler._private.commands import _bootstrap_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert raw["provider"]["region"] == REGION
    caches = (aws_utils.resource_cache, aws_utils.client_cache, aws_config._get_subnets_or_die)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"):
            patch.setenv(name, "testing")
        patch.setenv("AWS_DEFAULT_REGION", REGION)
        patch.delenv("AWS_ENDPOINT_URL", raising=False)  # the suite's local S3 server (conftest): AWS here is moto's in-process mock
        patch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")  # Ray attaches AWS-managed policies to its role
        patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))  # the key pair Ray creates lands in ~/.ssh
        # Ray waits 15 s twice for IAM to propagate; moto's IAM is consistent at once.
        patch.setattr(aws_config, "time", SimpleNamespace(sleep=lambda seconds: None, time=time.time))
        for cache in caches:
            cache.cache_clear()
        try:
            with mock_aws():
                config = _bootstrap_config(raw, no_config_cache=True)
                yield {"config": config, "ec2": boto3.client("ec2", region_name=REGION), "iam": boto3.client("iam", region_name=REGION)}
        finally:
            for cache in caches:
                cache.cache_clear()


def test_node_types_get_the_gpus_and_cpus_of_their_instance_types(bootstrapped):
    types = bootstrapped["config"]["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 8, "raycf_driver": 1}  # m6i.2xlarge: no GPU
    assert types["gpu_1x"]["resources"]["GPU"] == 1 and types["gpu_1x"]["resources"]["CPU"] == 4
    assert types["gpu_4x"]["resources"]["GPU"] == 4 and types["gpu_4x"]["resources"]["CPU"] == 48
    for name in ("gpu_1x", "gpu_4x"):
        assert types[name]["resources"]["accelerator_type:A10G"] == 1
        assert "raycf_driver" not in types[name]["resources"]
        assert types[name]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}


def test_the_head_gets_rays_instance_profile_with_s3_access(bootstrapped):
    config, iam = bootstrapped["config"], bootstrapped["iam"]
    profile = iam.get_instance_profile(InstanceProfileName="ray-autoscaler-v1")["InstanceProfile"]
    assert config["head_node"]["IamInstanceProfile"] == {"Arn": profile["Arn"]}
    (role,) = profile["Roles"]
    policies = {policy["PolicyName"] for policy in iam.list_attached_role_policies(RoleName=role["RoleName"])["AttachedPolicies"]}
    assert "AmazonS3FullAccess" in policies
    for name in ("gpu_1x", "gpu_4x"):  # workers keep their own S3-only profile
        assert config["available_node_types"][name]["node_config"]["IamInstanceProfile"] == {"Name": "raycf-worker"}


def test_a_key_pair_is_created_and_its_private_key_kept_private(bootstrapped):
    config, ec2 = bootstrapped["config"], bootstrapped["ec2"]
    key_names = {spec["node_config"]["KeyName"] for spec in config["available_node_types"].values()}
    assert len(key_names) == 1
    assert ec2.describe_key_pairs(KeyNames=list(key_names))["KeyPairs"]
    private_key = Path(config["auth"]["ssh_private_key"])
    assert private_key.is_file() and stat.S_IMODE(private_key.stat().st_mode) == 0o600


def test_the_security_group_lets_in_ssh_only(bootstrapped):
    config, ec2 = bootstrapped["config"], bootstrapped["ec2"]
    group_ids = {tuple(spec["node_config"]["SecurityGroupIds"]) for spec in config["available_node_types"].values()}
    assert len(group_ids) == 1
    ((group_id,),) = group_ids
    (group,) = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    from_outside = [rule for rule in group["IpPermissions"] if rule.get("IpRanges") or rule.get("Ipv6Ranges")]
    assert [(rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) for rule in from_outside] == [("tcp", 22, 22)]
    within_cluster = [rule for rule in group["IpPermissions"] if rule.get("UserIdGroupPairs")]
    assert [pair["GroupId"] for rule in within_cluster for pair in rule["UserIdGroupPairs"]] == [group_id]
    assert len(group["IpPermissions"]) == len(from_outside) + len(within_cluster)
