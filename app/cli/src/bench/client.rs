//! `loupe bench client`: the overhead of Loupe's Chat Completions client — requests per second
//! against a zero-latency OpenAI-compatible server (axum, on loopback, in this process) at
//! `--concurrency` requests in flight.
//!
//! The reference is the HTTP floor on this machine: a bare reqwest loop (a `reqwest::Client` built
//! with the same settings as [`Client`]'s, the same request body, POST and read the body; no
//! semaphore, no retry logic, no parsing). Also measured: [`Llm::ask`] with its on-disk cache in
//! a temporary folder, cold (every request a miss and a write) and warm (every request a hit).
//!
//! Server and client share one multi-threaded tokio runtime, so on a small machine the server's
//! own cost is part of every figure; the ratio is what the client leaves of the floor. The
//! variants run interleaved `--rounds` times; each reports its best round.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use loupe_autointerp::cache::Cache;
use loupe_autointerp::client::{ChatRequest, Client, ClientConfig, Message};
use loupe_autointerp::llm::{Llm, LlmConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Requests timed per variant and round.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Requests in flight at once (also the client's concurrency limit).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Untimed requests through each HTTP client first (opens the connections).
    #[arg(long, default_value_t = 2_000)]
    warmup: usize,
    /// Interleaved rounds of all variants; each variant reports its best.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

/// The server's one answer: a small valid chat completion with log-probabilities.
const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"[EXPLANATION]: whales and other large marine mammals"},"logprobs":{"content":[{"token":"[","logprob":-0.01,"top_logprobs":[{"token":"[","logprob":-0.01},{"token":"The","logprob":-4.6}]},{"token":"EXPL","logprob":-0.02,"top_logprobs":[{"token":"EXPL","logprob":-0.02},{"token":"EX","logprob":-3.9}]},{"token":"ANATION","logprob":-0.001,"top_logprobs":[{"token":"ANATION","logprob":-0.001},{"token":"AN","logprob":-7.2}]},{"token":"]:","logprob":-0.05,"top_logprobs":[{"token":"]:","logprob":-0.05},{"token":"]","logprob":-3.1}]},{"token":" whales","logprob":-0.7,"top_logprobs":[{"token":" whales","logprob":-0.7},{"token":" ocean","logprob":-1.2}]}]},"finish_reason":"stop"}],"usage":{"prompt_tokens":412,"completion_tokens":9,"total_tokens":421}}"#;

const TEXT: &str = "[EXPLANATION]: whales and other large marine mammals";

/// A prompt of realistic size (an explainer's system prompt and a few examples).
fn request(i: usize) -> ChatRequest {
    let examples: String = (0..8)
        .map(|k| format!("Example {k}: the <<whale>> surfaced near the boat, feature {i}.\n"))
        .collect();
    ChatRequest {
        messages: vec![
            Message {
                role: "system".into(),
                content: "You explain what a feature of a sparse autoencoder responds to. Answer with \
                          [EXPLANATION]: followed by a short phrase."
                    .into(),
            },
            Message { role: "user".into(), content: examples },
        ],
        max_tokens: 64,
        temperature: 0.0,
        top_logprobs: Some(2),
    }
}

/// The zero-latency server on 127.0.0.1; its base URL.
async fn serve() -> Result<String> {
    let app = Router::new().route(
        "/v1/chat/completions",
        post(|_body: Bytes| async { ([("content-type", "application/json")], ANSWER) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot bind loopback")?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}/v1"))
}

/// Process CPU time (user + system), in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// One timed pass: `requests` calls of `call(i)` from `concurrency` tasks. Returns (req/s, CPU µs
/// per request).
async fn drive<F, Fut>(requests: usize, concurrency: usize, call: F) -> Result<(f64, f64)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let call = Arc::new(call);
    let next = Arc::new(AtomicUsize::new(0));
    let cpu = cpu_seconds();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (call, next) = (call.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return Ok::<(), anyhow::Error>(());
                }
                call(i).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu;
    Ok((requests as f64 / wall, cpu * 1e6 / requests as f64))
}

/// Best (highest-rate) round of one variant.
#[derive(Default, Clone, Copy)]
struct Best {
    rate: f64,
    cpu_us: f64,
}

impl Best {
    fn add(&mut self, (rate, cpu_us): (f64, f64)) {
        if rate > self.rate {
            *self = Best { rate, cpu_us };
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    if args.requests == 0 || args.concurrency == 0 || args.rounds == 0 {
        bail!("bench client: --requests, --concurrency and --rounds must be positive");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let workers = runtime.metrics().num_workers();
    runtime.block_on(bench(args, workers))
}

async fn bench(args: &Args, workers: usize) -> Result<()> {
    let (n, c) = (args.requests, args.concurrency);
    let base_url = serve().await?;
    let mut llm_cfg = LlmConfig::new(&base_url, "bench-model");
    llm_cfg.concurrency = Some(c);
    let cfg: ClientConfig = llm_cfg.client_config();
    let client = Client::new(cfg.clone())?;

    // The floor: the same reqwest settings as Client::new, the same body bytes.
    let bare = reqwest::Client::builder().timeout(Duration::from_secs_f64(cfg.timeout_seconds)).build()?;
    let url = format!("{base_url}/chat/completions");
    let body = bytes_of(&client, &request(0))?;
    println!(
        "{n} requests per variant at concurrency {c}, {} rounds, {workers} tokio workers (server and client \
         share them); request body {} B, answer {} B",
        args.rounds,
        body.len(),
        ANSWER.len()
    );

    let bare_call = {
        let (bare, url, body) = (bare.clone(), url.clone(), body.clone());
        move |_i: usize| {
            let (bare, url, body) = (bare.clone(), url.clone(), body.clone());
            async move {
                let response =
                    bare.post(&url).header("content-type", "application/json").body(body).send().await?;
                let status = response.status();
                let read = response.bytes().await?;
                if !status.is_success() || read.len() != ANSWER.len() {
                    bail!("bare reqwest: HTTP {status}, {} B", read.len());
                }
                Ok(())
            }
        }
    };
    let same = Arc::new(request(0));
    let client_call = {
        let (client, req) = (client.clone(), same.clone());
        move |_i: usize| {
            let (client, req) = (client.clone(), req.clone());
            async move {
                let answer = client.chat(&req).await?;
                if answer.text != TEXT || answer.attempts != 1 {
                    bail!("Client::chat: unexpected answer {:?}", answer.text);
                }
                Ok(())
            }
        }
    };
    drive(args.warmup, c, bare_call.clone()).await.context("warm-up (bare reqwest)")?;
    drive(args.warmup, c, client_call.clone()).await.context("warm-up (Client::chat)")?;

    let tmp = tempfile::tempdir().context("cannot create a temporary cache folder")?;
    let (mut best_bare, mut best_client, mut best_cold, mut best_hits) =
        (Best::default(), Best::default(), Best::default(), Best::default());
    for round in 0..args.rounds {
        let bare_r = drive(n, c, bare_call.clone()).await.context("bare reqwest")?;
        let client_r = drive(n, c, client_call.clone()).await.context("Client::chat")?;

        // Llm::ask behind a fresh cache: distinct prompts, so the first pass misses on every one.
        let cache = Cache::open(&tmp.path().join(format!("round-{round}")))?;
        let llm = Arc::new(Llm::new(&llm_cfg, Some(cache), None)?);
        let requests: Arc<Vec<ChatRequest>> = Arc::new((0..n).map(request).collect());
        let ask = |want_cached: bool| {
            let (llm, requests) = (llm.clone(), requests.clone());
            move |i: usize| {
                let (llm, requests) = (llm.clone(), requests.clone());
                async move {
                    let answer = llm.ask(&requests[i], "the request").await?;
                    if answer.cached != want_cached || answer.response.text != TEXT {
                        bail!("Llm::ask: request {i} cached {} (expected {want_cached})", answer.cached);
                    }
                    Ok(())
                }
            }
        };
        let cold_r = drive(n, c, ask(false)).await.context("Llm::ask, cold cache")?;
        let hits_r = drive(n, c, ask(true)).await.context("Llm::ask, all hits")?;
        let spent = llm.spent();
        if spent.requests != n as u64 || spent.cached != n as u64 {
            bail!("Llm::ask: {} sent and {} cached, expected {n} each", spent.requests, spent.cached);
        }
        println!(
            "round {}: bare reqwest {:.0}, Client::chat {:.0}, Llm::ask cold {:.0}, Llm::ask hits {:.0} req/s",
            round + 1,
            bare_r.0,
            client_r.0,
            cold_r.0,
            hits_r.0
        );
        best_bare.add(bare_r);
        best_client.add(client_r);
        best_cold.add(cold_r);
        best_hits.add(hits_r);
    }

    println!("best of {} rounds (process CPU per request, server included):", args.rounds);
    for (name, b) in [
        ("bare reqwest (HTTP floor)", best_bare),
        ("Client::chat", best_client),
        ("Llm::ask, cold cache (miss + write)", best_cold),
        ("Llm::ask, all hits (no HTTP)", best_hits),
    ] {
        println!("  {name:<36} {:>8.0} req/s  {:>6.1} µs CPU/request", b.rate, b.cpu_us);
    }
    println!(
        "Client::chat costs {:.1} µs CPU/request over the floor; the cold cache {:.1} µs over Client::chat",
        best_client.cpu_us - best_bare.cpu_us,
        best_cold.cpu_us - best_client.cpu_us
    );
    println!(
        "client: {:.0} req/s at concurrency {c}, ratio {:.2} vs bare reqwest ({:.0} req/s); target 2000 req/s",
        best_client.rate,
        best_client.rate / best_bare.rate,
        best_bare.rate
    );
    Ok(())
}

/// The exact bytes `Client` sends for `req` (cheap to clone: one shared buffer).
fn bytes_of(client: &Client, req: &ChatRequest) -> Result<Bytes> {
    Ok(Bytes::from(serde_json::to_vec(&client.body(req))?))
}
