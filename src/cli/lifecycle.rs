//! The running process's edges: descriptor budget, signals (SIGHUP reload, SIGUSR1 log reopen,
//! SIGTERM/SIGINT), systemd readiness, and the socket handover of `run --takeover`.

use super::*;

/// Raises RLIMIT_NOFILE's soft limit to the hard one, then keeps `max_connections` within what
/// the descriptors allow, so the accept loops pause before the process runs out rather than at
/// it.
pub(crate) fn fit_to_fd_limit(config: &mut Config) {
    let nofile = match breakwater::admission::fd::raise_nofile() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise RLIMIT_NOFILE");
            return;
        }
    };
    let budget = breakwater::admission::fd::Budget::of(config, nofile);
    if let Some(advice) = budget.advice(config) {
        tracing::warn!(
            nofile,
            origin_pool = budget.origin,
            effective_max_connections = budget.effective,
            "{advice}"
        );
        config.admission.max_connections = budget.effective.min(u64::from(u32::MAX)) as u32;
    }
    tracing::info!(
        nofile,
        max_connections = config.admission.max_connections,
        "file-descriptor budget"
    );
}

/// The listeners of `config`, made from the sockets a running instance handed over (and bound
/// here for addresses it did not have); the admin socket if it passed one.
#[allow(clippy::type_complexity)]
pub(crate) fn adopt_listeners(
    config: &Config,
    mut handover: breakwater::takeover::Handover,
) -> Result<
    (
        Vec<breakwater::BoundListener>,
        Option<std::net::TcpListener>,
        breakwater::takeover::Handover,
    ),
    std::io::Error,
> {
    use breakwater::takeover::Kind;
    let passed = std::mem::take(&mut handover.passed);
    let mut listeners = Vec::new();
    let mut admin = None;
    let mut by_addr: Vec<(SocketAddr, Vec<std::net::TcpListener>)> = Vec::new();
    for p in passed {
        let sock = std::net::TcpListener::from(p.fd);
        match p.kind {
            Kind::Admin if config.admin.as_ref().is_some_and(|a| a.addr == p.addr) => {
                admin = Some(sock)
            }
            Kind::Admin => {}
            Kind::Listener => match by_addr.iter_mut().find(|(a, _)| *a == p.addr) {
                Some((_, v)) => v.push(sock),
                None => by_addr.push((p.addr, vec![sock])),
            },
        }
    }
    for l in &config.listeners {
        let taken = by_addr
            .iter()
            .position(|(a, _)| *a == l.addr)
            .map(|i| by_addr.swap_remove(i).1)
            .unwrap_or_default();
        if taken.is_empty() {
            listeners.push(breakwater::listener::bind(l)?);
        } else {
            tracing::info!(addr = %l.addr, sockets = taken.len(), "took over listening sockets");
            listeners.push(breakwater::listener::adopt(l, taken)?);
        }
    }
    for (addr, _) in by_addr {
        tracing::warn!(%addr, "the old instance listened here but this config does not; closing");
    }
    Ok((listeners, admin, handover))
}

/// Offers this instance's sockets on the control socket. The previous owner of the path may
/// still be letting it go, so binding is retried for a moment.
pub(crate) async fn offer_takeover(
    path: PathBuf,
    offered: Vec<(breakwater::takeover::Kind, SocketAddr, std::os::fd::OwnedFd)>,
    taken_over: std::sync::Arc<tokio::sync::Notify>,
) {
    let drain: std::sync::Arc<dyn Fn() + Send + Sync> = std::sync::Arc::new(move || {
        taken_over.notify_one();
    });
    let mut offered = Some(offered);
    for _ in 0..40 {
        let Some(o) = offered.take() else { return };
        // Keep a copy in case binding fails and is retried.
        let copy: Vec<_> = o
            .iter()
            .filter_map(|(k, a, fd)| fd.try_clone().ok().map(|fd| (*k, *a, fd)))
            .collect();
        match breakwater::takeover::serve(&path, o, drain.clone()) {
            Ok(p) => {
                tracing::info!(control_socket = %p.display(), "takeover offered: `breakwater run --takeover` replaces this process without refusing a connection");
                return;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                offered = Some(copy);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => {
                tracing::info!(control_socket = %path.display(), error = %e, "takeover not offered (no control socket)");
                return;
            }
        }
    }
    tracing::warn!(control_socket = %path.display(), "takeover not offered: the control socket stays in use");
}

/// Under systemd `Type=notify`: READY=1 once every listener is bound and the warm pools are
/// filled. A no-op elsewhere (no NOTIFY_SOCKET).
pub(crate) fn notify_systemd(shared: std::sync::Arc<breakwater::Shared>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    tokio::spawn(async move {
        while !shared.ready.load(std::sync::atomic::Ordering::Acquire) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
            tracing::warn!(error = %e, "cannot tell systemd we are ready");
        }
        let mut draining = shared.draining().subscribe();
        if draining.wait_for(|d| *d).await.is_ok() {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        }
    });
}

/// SIGUSR1 reopens the access log file, for logrotate (`postrotate kill -USR1 <pid>`).
pub(crate) fn reopen_on_sigusr1() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        return;
    };
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            match breakwater::telemetry::reopen_access_log() {
                Ok(()) => tracing::info!("SIGUSR1: access log reopened"),
                Err(e) => tracing::error!(error = %e, "SIGUSR1: cannot reopen the access log"),
            }
        }
    });
}

/// SIGHUP re-reads the config file (and the TLS certificates) and applies it to the running
/// engine; a config that does not load is logged with the same error `check` gives, and the
/// running config stays. It must be handled at all: its default action kills the process.
pub(crate) fn reload_on_sighup(
    reloader: breakwater::Reloader,
    tls: std::sync::Arc<breakwater::conn::tls::TlsListeners>,
    path: Option<PathBuf>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP; it will stop the process");
            return;
        }
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let Some(path) = &path else {
                let failed = tls.reload();
                tracing::info!(
                    tls_listeners_failed = failed,
                    "SIGHUP: TLS certificates re-read"
                );
                continue;
            };
            match Config::load(path) {
                Ok(mut config) => {
                    for w in &config.warnings {
                        tracing::warn!("{w}");
                    }
                    fit_to_fd_limit(&mut config);
                    match reloader.reload(config).await {
                        Ok(what) => tracing::info!(config = %path.display(), "SIGHUP: {what}"),
                        Err(e) => tracing::error!(config = %path.display(),
                            "SIGHUP: reload failed, keeping the running config: {e}"),
                    }
                }
                Err(e) => {
                    reloader.record_failure();
                    // Certificates rotate on their own schedule: still re-read them.
                    let failed = tls.reload();
                    tracing::error!(
                        tls_listeners_failed = failed,
                        "SIGHUP: reload failed, keeping the running config: {e}"
                    );
                }
            }
        }
    });
}

pub(crate) async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
