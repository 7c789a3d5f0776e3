//! Routing: which upstream serves a request, by Host and longest path prefix. Never by the
//! host an absolute-form target names unless a configured route matches it: Breakwater is not
//! an open proxy.

use crate::config::RouteConfig;

#[derive(Debug)]
pub struct Router {
    routes: Vec<RouteConfig>,
    /// With no routes and exactly one upstream, everything goes there.
    fallback: Option<usize>,
}

impl Router {
    pub fn new(routes: Vec<RouteConfig>, upstreams: usize) -> Router {
        let fallback = (routes.is_empty() && upstreams == 1).then_some(0);
        Router { routes, fallback }
    }

    /// The upstream index for a host (without port, any case) and path. Longest prefix wins;
    /// ties go to the first route in the file.
    pub fn pick(&self, host: Option<&str>, path: &str) -> Option<usize> {
        if let Some(f) = self.fallback {
            return Some(f);
        }
        let mut best: Option<&RouteConfig> = None;
        for r in &self.routes {
            let host_ok = match (&r.host, host) {
                (None, _) => true,
                (Some(p), Some(h)) => p.matches(h),
                (Some(_), None) => false,
            };
            if host_ok
                && path.starts_with(&r.path_prefix)
                && best.is_none_or(|b| r.path_prefix.len() > b.path_prefix.len())
            {
                best = Some(r);
            }
        }
        best.map(|r| r.upstream)
    }
}

/// The host part of a Host header or authority: port and IPv6 brackets dropped.
pub fn host_only(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostPattern;

    fn route(host: Option<HostPattern>, prefix: &str, upstream: usize) -> RouteConfig {
        RouteConfig {
            host,
            path_prefix: prefix.into(),
            upstream,
        }
    }

    #[test]
    fn longest_prefix_then_first() {
        let r = Router::new(
            vec![
                route(None, "/", 0),
                route(None, "/api", 1),
                route(None, "/api", 2),
                route(
                    Some(HostPattern::Exact("shop.example.com".into())),
                    "/api/v2",
                    3,
                ),
            ],
            4,
        );
        assert_eq!(r.pick(Some("x"), "/index.html"), Some(0));
        assert_eq!(r.pick(Some("x"), "/api/v2/items"), Some(1));
        assert_eq!(r.pick(Some("shop.example.com"), "/api/v2/items"), Some(3));
        assert_eq!(r.pick(None, "/api/v2/items"), Some(1));
    }

    #[test]
    fn no_match() {
        let r = Router::new(
            vec![route(
                Some(HostPattern::Suffix(".example.com".into())),
                "/",
                0,
            )],
            1,
        );
        assert_eq!(r.pick(Some("evil.test"), "/"), None);
        assert_eq!(r.pick(Some("a.example.com"), "/"), Some(0));
    }

    #[test]
    fn host_only_strips_port() {
        assert_eq!(host_only("a.example.com:8080"), "a.example.com");
        assert_eq!(host_only("[::1]:80"), "::1");
        assert_eq!(host_only("a"), "a");
    }
}
