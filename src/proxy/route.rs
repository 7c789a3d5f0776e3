//! Routing: which upstream serves a request, by Host and longest path prefix. Never by the
//! host an absolute-form target names unless a configured route matches it: Breakwater is not
//! an open proxy.

use crate::config::RouteConfig;

#[derive(Debug)]
pub struct Router {
    /// With no routes and exactly one upstream, one implicit route sends everything there.
    routes: Vec<RouteConfig>,
}

impl Router {
    pub fn new(routes: Vec<RouteConfig>, upstreams: usize) -> Router {
        let routes = if routes.is_empty() && upstreams == 1 {
            vec![RouteConfig {
                host: None,
                path_prefix: "/".into(),
                upstream: 0,
                allow_encoded_slashes: false,
            }]
        } else {
            routes
        };
        Router { routes }
    }

    /// The route (index) for a host (lower-case, without port) and a normalised path. Longest
    /// prefix wins, matched on segment boundaries (`/api` never takes `/api-internal`); ties
    /// go to the first route in the file.
    pub fn pick(&self, host: Option<&str>, path: &str) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, r) in self.routes.iter().enumerate() {
            let host_ok = match (&r.host, host) {
                (None, _) => true,
                (Some(p), Some(h)) => p.matches(h),
                (Some(_), None) => false,
            };
            if host_ok
                && crate::target::prefix_matches(&r.path_prefix, path)
                && best.is_none_or(|b| r.path_prefix.len() > self.routes[b].path_prefix.len())
            {
                best = Some(i);
            }
        }
        best
    }

    pub fn routes(&self) -> &[RouteConfig] {
        &self.routes
    }

    /// "host/prefix" as metrics label it ("*" for any host).
    pub fn label(&self, route: usize) -> String {
        let r = &self.routes[route];
        format!(
            "{}{}",
            r.host.as_ref().map_or("*".to_string(), |h| h.to_string()),
            r.path_prefix
        )
    }
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
            allow_encoded_slashes: false,
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
        let up = |h, p| r.pick(h, p).map(|i| r.routes()[i].upstream);
        assert_eq!(up(Some("x"), "/index.html"), Some(0));
        assert_eq!(up(Some("x"), "/api/v2/items"), Some(1));
        assert_eq!(up(Some("shop.example.com"), "/api/v2/items"), Some(3));
        assert_eq!(up(None, "/api/v2/items"), Some(1));
        assert_eq!(r.label(3), "shop.example.com/api/v2");
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
}
