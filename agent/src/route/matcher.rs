//! Request matching within a route: a rule's matches (method, path exact or by whole-segment
//! prefix, header values), converted once from the controller's protobuf.

use http::{HeaderName, HeaderValue, Method};
use weir_proto::v1 as pb;

/// Why a match from the controller cannot be used (part of the update's NACK).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum MatchError {
    #[error("bad method {0:?}")]
    Method(String),
    #[error("path {0:?} does not start with /")]
    RelativePath(String),
    #[error("unknown path match kind {0}")]
    PathKind(i32),
    #[error("bad header name {0:?}")]
    HeaderName(String),
    #[error("bad header value for {0:?}")]
    HeaderValue(String),
}

#[derive(Debug)]
pub(crate) struct MatchRt {
    method: Option<Method>,
    path: Option<PathRt>,
    headers: Box<[(HeaderName, HeaderValue)]>,
}

#[derive(Debug)]
pub(crate) enum PathRt {
    Exact(Box<str>),
    Prefix(Box<str>),
}

impl MatchRt {
    pub(crate) fn build(m: &pb::Match) -> Result<Self, MatchError> {
        let method = if m.method.is_empty() {
            None
        } else {
            Some(
                Method::from_bytes(m.method.as_bytes())
                    .map_err(|_| MatchError::Method(m.method.clone()))?,
            )
        };
        let path = match &m.path {
            None => None,
            Some(p) => {
                if !p.value.starts_with('/') {
                    return Err(MatchError::RelativePath(p.value.clone()));
                }
                Some(match pb::path_match::Kind::try_from(p.kind) {
                    Ok(pb::path_match::Kind::Exact) => PathRt::Exact(p.value.as_str().into()),
                    Ok(pb::path_match::Kind::Prefix) => {
                        // "/api/" and "/api" mean the same prefix.
                        let v = p.value.trim_end_matches('/');
                        PathRt::Prefix(v.into())
                    }
                    Err(_) => return Err(MatchError::PathKind(p.kind)),
                })
            }
        };
        let mut headers = Vec::with_capacity(m.headers.len());
        for h in &m.headers {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| MatchError::HeaderName(h.name.clone()))?;
            let value = HeaderValue::from_str(&h.value)
                .map_err(|_| MatchError::HeaderValue(h.name.clone()))?;
            headers.push((name, value));
        }
        Ok(Self {
            method,
            path,
            headers: headers.into_boxed_slice(),
        })
    }

    pub(crate) fn matches(&self, method: &Method, path: &str, headers: &http::HeaderMap) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let path_ok = match &self.path {
            None => true,
            Some(PathRt::Exact(p)) => path == &**p,
            // Gateway API prefix semantics: whole path segments only, so /api matches /api
            // and /api/x but not /apix.
            Some(PathRt::Prefix(p)) => {
                path.starts_with(&**p) && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
        };
        if !path_ok {
            return false;
        }
        self.headers
            .iter()
            .all(|(n, v)| headers.get_all(n).iter().any(|x| x == v))
    }
}
