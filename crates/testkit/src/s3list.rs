//! The local S3 server: s3s-fs, with one operation replaced. s3s-fs answers every ListObjectsV2
//! page by walking and stat-ing the whole bucket through tokio's blocking pool, so listing 100,000
//! objects takes minutes and would measure the test server, not walnut. [`FastList`] answers a
//! page (without a delimiter) by reading only the directories under the prefix, sorting the keys,
//! and stat-ing just the keys it returns. Every other operation goes to s3s-fs unchanged.

use s3s::dto::*;
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};
use std::path::{Path, PathBuf};

pub struct FastList {
    pub inner: s3s_fs::FileSystem,
    pub root: PathBuf,
}

/// Keys (relative to `bucket_dir`, `/`-separated) of the regular files below the directory that
/// holds `prefix`, that start with `prefix`. Hidden names (s3s-fs internals) are skipped.
fn keys_under(bucket_dir: &Path, prefix: &str) -> std::io::Result<Vec<String>> {
    let dir_part = prefix.rfind('/').map(|i| &prefix[..i]).unwrap_or("");
    let mut out = Vec::new();
    let mut stack = vec![(bucket_dir.join(dir_part), dir_part.to_string())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in rd {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let key = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            if entry.file_type()?.is_dir() {
                if key.starts_with(prefix) || prefix.starts_with(&format!("{key}/")) {
                    stack.push((entry.path(), key));
                }
            } else if key.starts_with(prefix) {
                out.push(key);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn page(bucket_dir: &Path, input: &ListObjectsV2Input) -> std::io::Result<ListObjectsV2Output> {
    let prefix = input.prefix.as_deref().unwrap_or("").trim_start_matches('/');
    let max_keys = usize::try_from(input.max_keys.unwrap_or(1000)).unwrap_or(1000).min(1000);
    let after = match (input.continuation_token.as_deref(), input.start_after.as_deref()) {
        (Some(c), Some(s)) => Some(c.max(s)),
        (c, s) => c.or(s),
    };
    let keys = keys_under(bucket_dir, prefix)?;
    let from = after.map(|a| keys.partition_point(|k| k.as_str() <= a)).unwrap_or(0);
    let chosen = &keys[from..(from + max_keys).min(keys.len())];
    let mut contents = Vec::with_capacity(chosen.len());
    for key in chosen {
        let meta = match std::fs::metadata(bucket_dir.join(key)) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // deleted meanwhile
            Err(e) => return Err(e),
        };
        contents.push(Object {
            key: Some(key.clone()),
            last_modified: Some(Timestamp::from(meta.modified()?)),
            size: Some(i64::try_from(meta.len()).unwrap_or(i64::MAX)),
            ..Default::default()
        });
    }
    let is_truncated = from + chosen.len() < keys.len();
    Ok(ListObjectsV2Output {
        key_count: Some(contents.len() as i32),
        max_keys: Some(max_keys as i32),
        is_truncated: Some(is_truncated),
        next_continuation_token: if is_truncated { chosen.last().cloned() } else { None },
        contents: (!contents.is_empty()).then_some(contents),
        continuation_token: input.continuation_token.clone(),
        name: Some(input.bucket.clone()),
        prefix: input.prefix.clone(),
        start_after: input.start_after.clone(),
        encoding_type: input.encoding_type.clone(),
        ..Default::default()
    })
}

#[async_trait::async_trait]
impl S3 for FastList {
    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> S3Result<S3Response<ListObjectsV2Output>> {
        if req.input.delimiter.is_some() {
            return self.inner.list_objects_v2(req).await;
        }
        let bucket = req.input.bucket.clone();
        if bucket.is_empty() || bucket.contains(['/', '.']) {
            return Err(s3_error!(InvalidBucketName));
        }
        let bucket_dir = self.root.join(&bucket);
        if !bucket_dir.is_dir() {
            return Err(s3_error!(NoSuchBucket));
        }
        let input = req.input;
        match tokio::task::spawn_blocking(move || page(&bucket_dir, &input)).await {
            Ok(Ok(out)) => Ok(S3Response::new(out)),
            Ok(Err(e)) => Err(s3_error!(InternalError, "list: {e}")),
            Err(e) => Err(s3_error!(InternalError, "list task: {e}")),
        }
    }

    async fn create_bucket(&self, req: S3Request<CreateBucketInput>) -> S3Result<S3Response<CreateBucketOutput>> {
        self.inner.create_bucket(req).await
    }
    async fn copy_object(&self, req: S3Request<CopyObjectInput>) -> S3Result<S3Response<CopyObjectOutput>> {
        self.inner.copy_object(req).await
    }
    async fn delete_bucket(&self, req: S3Request<DeleteBucketInput>) -> S3Result<S3Response<DeleteBucketOutput>> {
        self.inner.delete_bucket(req).await
    }
    async fn delete_object(&self, req: S3Request<DeleteObjectInput>) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.inner.delete_object(req).await
    }
    async fn delete_objects(&self, req: S3Request<DeleteObjectsInput>) -> S3Result<S3Response<DeleteObjectsOutput>> {
        self.inner.delete_objects(req).await
    }
    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.inner.get_bucket_location(req).await
    }
    async fn get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        self.inner.get_object(req).await
    }
    async fn head_bucket(&self, req: S3Request<HeadBucketInput>) -> S3Result<S3Response<HeadBucketOutput>> {
        self.inner.head_bucket(req).await
    }
    async fn head_object(&self, req: S3Request<HeadObjectInput>) -> S3Result<S3Response<HeadObjectOutput>> {
        self.inner.head_object(req).await
    }
    async fn list_buckets(&self, req: S3Request<ListBucketsInput>) -> S3Result<S3Response<ListBucketsOutput>> {
        self.inner.list_buckets(req).await
    }
    async fn list_objects(&self, req: S3Request<ListObjectsInput>) -> S3Result<S3Response<ListObjectsOutput>> {
        self.inner.list_objects(req).await
    }
    async fn put_object(&self, req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        self.inner.put_object(req).await
    }
    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.inner.create_multipart_upload(req).await
    }
    async fn upload_part(&self, req: S3Request<UploadPartInput>) -> S3Result<S3Response<UploadPartOutput>> {
        self.inner.upload_part(req).await
    }
    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        self.inner.upload_part_copy(req).await
    }
    async fn list_parts(&self, req: S3Request<ListPartsInput>) -> S3Result<S3Response<ListPartsOutput>> {
        self.inner.list_parts(req).await
    }
    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.inner.complete_multipart_upload(req).await
    }
    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.inner.abort_multipart_upload(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_under_a_prefix_in_order() {
        let d = tempfile::tempdir().unwrap();
        for k in ["r/wal/00000001/b", "r/wal/00000001/a", "r/wal/00000002/c", "r/backups/x", "other/y", "r/.hidden"] {
            let p = d.path().join(k);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, k).unwrap();
        }
        assert_eq!(
            keys_under(d.path(), "r/wal/").unwrap(),
            ["r/wal/00000001/a", "r/wal/00000001/b", "r/wal/00000002/c"]
        );
        assert_eq!(keys_under(d.path(), "r/wal/00000001/b").unwrap(), ["r/wal/00000001/b"]);
        assert_eq!(keys_under(d.path(), "r/w").unwrap().len(), 3);
        assert_eq!(keys_under(d.path(), "").unwrap().len(), 5);
        let input = |token: Option<&str>| ListObjectsV2Input {
            bucket: "b".into(),
            prefix: Some("r/".into()),
            max_keys: Some(2),
            continuation_token: token.map(String::from),
            ..Default::default()
        };
        let p1 = page(d.path(), &input(None)).unwrap();
        assert_eq!(p1.is_truncated, Some(true));
        let keys = |p: &ListObjectsV2Output| -> Vec<String> {
            p.contents.iter().flatten().map(|o| o.key.clone().unwrap()).collect()
        };
        assert_eq!(keys(&p1), ["r/backups/x", "r/wal/00000001/a"]);
        let p2 = page(d.path(), &input(p1.next_continuation_token.as_deref())).unwrap();
        assert_eq!(keys(&p2), ["r/wal/00000001/b", "r/wal/00000002/c"]);
        assert_eq!(p2.is_truncated, Some(false));
        assert_eq!(p2.next_continuation_token, None);
    }
}
