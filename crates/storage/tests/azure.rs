//! `az://` against Azurite (Microsoft's emulator, on 127.0.0.1): the conformance suite, create-only
//! writes that really are exclusive, and refused credentials typed without the key.

use bytes::Bytes;
use walnut_storage::conformance::{self, Capabilities};
use walnut_storage::{PutMode, Secret, StorageError, StorageOptions, open};
use walnut_testkit::Azurite;

fn options(az: &Azurite) -> StorageOptions {
    StorageOptions {
        azure: az.settings().into_iter().map(|(k, v)| (k.to_string(), Secret::new(v))).collect(),
        ..StorageOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_backend_conforms() {
    let az = Azurite::start();
    let url = format!("az://{}/conformance/prefix", walnut_testkit::azurite::CONTAINER);
    let store = open(&url, &options(&az)).unwrap();
    conformance::run_all(store.as_ref(), Capabilities { atomic_create: true }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_with_a_wrong_key_is_a_typed_permanent_error_without_the_key() {
    let az = Azurite::start();
    let wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=";
    let mut o = options(&az);
    o.azure.push(("azure_storage_account_key".into(), Secret::new(wrong)));
    let store = open(&format!("az://{}/x", walnut_testkit::azurite::CONTAINER), &o).unwrap();
    let e = store.put("a/b", Bytes::from_static(b"x"), PutMode::Create).await.unwrap_err();
    assert!(e.is_access_denied(), "{e:?}");
    assert!(!e.is_retryable(), "{e}");
    assert!(!format!("{e} {e:?}").contains(wrong), "the key leaked: {e:?}");
    // A container that does not exist is a permanent error naming the object, not a taken key.
    let missing = open("az://no-such-container/x", &options(&az)).unwrap();
    let e = missing.put("a", Bytes::from_static(b"x"), PutMode::Create).await.unwrap_err();
    assert!(matches!(e, StorageError::NotFound { .. }), "{e:?}");
    assert!(e.to_string().starts_with("put a: "), "{e}");
}
