"""The SigV4 signer against the signatures AWS publishes (moto does not check them closely)."""

import hashlib

import pytest

from polykit_cache.sigv4 import EMPTY_SHA256, Credentials, authorization, signature

# AWS's Signature Version 4 test suite (credentials, region and date of every case there).
SUITE = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
# Amazon S3 API reference, "Signature calculations for the Authorization header: transferring
# payload in a single chunk": its examples' key, bucket and date.
S3 = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
S3_HOST = "examplebucket.s3.amazonaws.com"
S3_DATE = "20130524T000000Z"
WELCOME = hashlib.sha256(b"Welcome to Amazon S3.").hexdigest()


def test_the_suite_s_get_vanilla():
    headers = {"host": "example.amazonaws.com", "x-amz-date": "20150830T123600Z"}
    assert authorization("GET", "/", [], headers, EMPTY_SHA256, SUITE, "us-east-1", "service", "20150830T123600Z") == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31")


def test_the_suite_s_query_order():
    headers = {"host": "example.amazonaws.com", "x-amz-date": "20150830T123600Z"}
    _, sig = signature("GET", "/", [("Param2", "value2"), ("Param1", "value1")], headers, EMPTY_SHA256, SUITE,
                       "us-east-1", "service", "20150830T123600Z")
    assert sig == "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"


@pytest.mark.parametrize("method, path, params, extra, payload, expected", [
    ("GET", "/test.txt", [], {"range": "bytes=0-9"}, EMPTY_SHA256,
     "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"),
    ("PUT", "/test%24file.text", [], {"date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
     WELCOME, "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"),
    ("GET", "/", [("lifecycle", "")], {}, EMPTY_SHA256,
     "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"),
    ("GET", "/", [("max-keys", "2"), ("prefix", "J")], {}, EMPTY_SHA256,
     "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"),
], ids=["get-object", "put-object", "get-lifecycle", "list-objects"])
def test_the_s3_reference_examples(method, path, params, extra, payload, expected):
    headers = {"host": S3_HOST, "x-amz-date": S3_DATE, "x-amz-content-sha256": payload, **extra}
    signed, sig = signature(method, path, params, headers, payload, S3, "us-east-1", "s3", S3_DATE)
    assert sig == expected
    assert signed == ";".join(sorted(headers))


def test_the_secret_never_shows_in_a_repr():
    creds = Credentials("AKID", "very-secret", "session-secret")
    assert "very-secret" not in repr(creds) and "session-secret" not in repr(creds)
