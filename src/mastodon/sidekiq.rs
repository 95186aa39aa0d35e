//! The Sidekiq command line as `sidekiq/cli.rb` reads it, and Mastodon's queues.
//!
//! Only what the doctor needs: `-c/--concurrency`, `-q/--queue NAME[,WEIGHT]` (repeatable),
//! `-C/--config FILE`. The CLI overrides the config file: any `-q` replaces the whole
//! `:queues:` list of `config/sidekiq.yml`, and `-c` replaces `:concurrency:`.

/// Mastodon's queues (`config/sidekiq.yml` on main, 4.4+), in order of importance.
pub const QUEUES: &[&str] = &[
    "default",
    "push",
    "ingress",
    "mailers",
    "pull",
    "scheduler",
    "fasp",
];

/// Sidekiq's concurrency when neither `-c` nor `SIDEKIQ_CONCURRENCY` is given.
pub const DEFAULT_CONCURRENCY: u32 = 5;

/// One `-q` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueArg {
    /// Queue name.
    pub name: String,
    /// The weight text after the comma, if any.
    pub weight: Option<String>,
}

/// What a Sidekiq command line says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SidekiqCommand {
    /// `-c` value as written.
    pub concurrency: Option<String>,
    /// `-q` values in order; empty means "the queues of sidekiq.yml" (all of them).
    pub queues: Vec<QueueArg>,
    /// `-C` config file, if any.
    pub config_file: Option<String>,
}

/// Finds the `sidekiq` program in `words` and parses its options. `None` if no word is the
/// `sidekiq` program (e.g. a shell wrapper whose script we cannot see; a `sh -c "…"` script is
/// split and searched too).
pub fn parse_command(words: &[String]) -> Option<SidekiqCommand> {
    if let Some(at) = words.iter().position(|w| is_sidekiq(w)) {
        return Some(parse_args(&words[at + 1..]));
    }
    // `bash -lc 'cd … && exec bundle exec sidekiq -c 5'`: look inside multi-word arguments.
    for w in words.iter().filter(|w| w.contains(char::is_whitespace)) {
        let inner: Vec<String> = super::systemd::split_words(w)
            .into_iter()
            .flat_map(|x| {
                // `&&`, `;` end the sidekiq command.
                x.split(';').map(str::to_owned).collect::<Vec<_>>()
            })
            .collect();
        if let Some(at) = inner.iter().position(|w| is_sidekiq(w)) {
            let rest: Vec<String> = inner[at + 1..]
                .iter()
                .take_while(|w| !matches!(w.as_str(), "&&" | "||" | "|" | ""))
                .cloned()
                .collect();
            return Some(parse_args(&rest));
        }
    }
    None
}

fn is_sidekiq(word: &str) -> bool {
    word == "sidekiq" || word.ends_with("/sidekiq")
}

fn parse_args(args: &[String]) -> SidekiqCommand {
    let mut cmd = SidekiqCommand::default();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (a, None),
        };
        let take = |i: &mut usize| -> Option<String> {
            if let Some(v) = inline.clone() {
                return Some(v);
            }
            *i += 1;
            args.get(*i).cloned()
        };
        match flag {
            "-c" | "--concurrency" => cmd.concurrency = take(&mut i),
            "-q" | "--queue" => {
                if let Some(v) = take(&mut i) {
                    cmd.queues.push(queue_arg(&v));
                }
            }
            "-C" | "--config" => cmd.config_file = take(&mut i),
            // Options with a value we do not use.
            "-e" | "--environment" | "-g" | "--tag" | "-r" | "--require" | "-t" | "--timeout"
            | "-P" | "--pidfile" | "-L" | "--logfile" => {
                take(&mut i);
            }
            _ if flag.starts_with("-c") && flag.len() > 2 && !flag.starts_with("--") => {
                cmd.concurrency = Some(flag[2..].to_owned())
            }
            _ if flag.starts_with("-q") && flag.len() > 2 && !flag.starts_with("--") => {
                cmd.queues.push(queue_arg(&flag[2..]))
            }
            _ => {}
        }
        i += 1;
    }
    cmd
}

fn queue_arg(v: &str) -> QueueArg {
    match v.split_once(',') {
        Some((n, w)) => QueueArg {
            name: n.to_owned(),
            weight: Some(w.to_owned()),
        },
        None => QueueArg {
            name: v.to_owned(),
            weight: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        crate::mastodon::systemd::split_words(s)
    }

    #[test]
    fn hachyderm_command() {
        let c = parse_command(&words("/usr/bin/bundle exec sidekiq -c 10 -q default")).unwrap();
        assert_eq!(c.concurrency.as_deref(), Some("10"));
        assert_eq!(c.queues.len(), 1);
        assert_eq!(c.queues[0].name, "default");
    }

    #[test]
    fn weights_long_options_and_shell_wrappers() {
        let c = parse_command(&words(
            "bundle exec sidekiq --concurrency=20 -q default,8 --queue push,6 -qpull -C config/sidekiq.yml",
        ))
        .unwrap();
        assert_eq!(c.concurrency.as_deref(), Some("20"));
        let names: Vec<_> = c.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, ["default", "push", "pull"]);
        assert_eq!(c.queues[0].weight.as_deref(), Some("8"));
        assert_eq!(c.config_file.as_deref(), Some("config/sidekiq.yml"));

        let c = parse_command(&words(
            "/bin/bash -lc 'cd /home/mastodon/live && exec bundle exec sidekiq -c 5 -q scheduler'",
        ))
        .unwrap();
        assert_eq!(c.concurrency.as_deref(), Some("5"));
        assert_eq!(c.queues[0].name, "scheduler");
        assert_eq!(
            parse_command(&words("/usr/bin/puma -C config/puma.rb")),
            None
        );
    }
}
