"""Finding 9: the key policy was wider than the docs said. The root ``kms:*`` delegation let any
principal with ``kms:Decrypt`` on ``*`` (plus table read) unseal cached tokens.

The key policy now denies every principal but the three function roles any use of ``TokenKey``
in the token cache's encryption context. That closes the gap only if every cached token's data
key needs that context to be opened: shown here against KMS on moto server. (moto does not
evaluate key-policy conditions, so the statement itself is checked as written.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from mailbroker.tokens import crypto
from mailbroker.tokens.crypto import TokenCipher

from mailbroker_sandbox.aws import load_template

TEMPLATE = load_template(Path(__file__).resolve().parents[2] / "template.yaml")
FUNCTION_ROLES = {"TokenBrokerRole", "SenderRole", "KeeperRole"}


def _statements() -> list[dict]:
    return TEMPLATE["Resources"]["TokenKey"]["Properties"]["KeyPolicy"]["Statement"]


def test_finding_9_only_the_function_roles_may_use_the_token_cache_context():
    (deny,) = [s for s in _statements() if s["Effect"] == "Deny"]

    assert deny["Principal"] == "*" and deny["Resource"] == "*"
    # Opening a data key (Decrypt), moving it under another key (ReEncryptFrom) and minting or
    # sealing new ones: all in the context the token cache uses.
    assert set(deny["Action"]) == {"kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey*", "kms:ReEncrypt*"}
    assert deny["Condition"]["StringEquals"] == {"kms:EncryptionContext:purpose": crypto._CONTEXT["purpose"]}
    roles = {item["Fn::GetAtt"][0] for item in deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"]}
    assert roles == FUNCTION_ROLES


def test_finding_9_the_root_delegation_remains_so_the_key_stays_manageable():
    (root,) = [s for s in _statements() if s.get("Sid") == "AccountAdministers"]
    assert root["Effect"] == "Allow" and root["Action"] == "kms:*"


@pytest.fixture
def kms(stack):
    client = stack.client("kms")
    key_id = stack.function_env("TokenBrokerFunction")["TOKEN_KEY_ID"]
    return client, key_id


def test_finding_9_a_cached_tokens_data_key_opens_only_in_the_token_cache_context(kms):
    client, key_id = kms
    cipher = TokenCipher(client, key_id)
    sealed = cipher.seal(b"access-token", b"cache-key")

    # Without the context (what a principal outside the Deny's condition would have to do): refused.
    with pytest.raises(ClientError) as refused:
        client.decrypt(CiphertextBlob=sealed.encrypted_key, KeyId=key_id)
    assert refused.value.response["Error"]["Code"] == "InvalidCiphertextException"
    with pytest.raises(ClientError):
        client.decrypt(
            CiphertextBlob=sealed.encrypted_key, KeyId=key_id, EncryptionContext={"purpose": "other"}
        )

    # With it, exactly the request the Deny statement matches for anyone but the function roles.
    opened = client.decrypt(
        CiphertextBlob=sealed.encrypted_key, KeyId=key_id, EncryptionContext=crypto._CONTEXT
    )
    assert TokenCipher(client, key_id).open(sealed, b"cache-key") == b"access-token"
    assert opened["Plaintext"]
