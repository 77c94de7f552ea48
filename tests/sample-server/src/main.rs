//! `sample-server`: serves deterministic sample posts over local HTTP, for the demo and the
//! benchmark. `GET /posts/{id}` gives one post, `GET /posts` all of them.

use clap::Parser;

/// Command line of the sample server.
#[derive(Parser)]
#[command(
    name = "sample-server",
    about = "serve deterministic sample posts over HTTP"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8088")]
    listen: String,
    /// Number of posts (ids 1..=N).
    #[arg(long, default_value_t = 10_000)]
    posts: u64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sample-server: cannot listen on {}: {e}", args.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    eprintln!(
        "sample-server: {} posts on http://{}/posts/{{id}}",
        args.posts, args.listen
    );
    match taskmill_sample_server::serve(listener, args.posts).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sample-server: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
