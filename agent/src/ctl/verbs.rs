//! netfaultctl's one-line verbs (`netfaultctl delay 100ms --jitter 10ms
//! --pod shop/cart --for 5m`): a subcommand per action type, built from the
//! API crate's verb table (`netfault_api::action::verbs`), which its tests
//! hold to the parsers. A verb's flags become the fault JSON, validated by
//! the API's own `FaultSpec::parse` before anything is sent; an error names
//! the flag and the API's field.

use clap::{Arg, ArgAction, ArgMatches, Command};
use netfault_api::action::verbs::{
    action_json, fault_json, flag_for_field, verb, FieldKind, Verb, COMMON_FLAGS, VERBS,
};
use netfault_api::{FaultSpec, Limits};
use serde_json::Value;

/// The id of a verb's positional argument.
const POSITIONAL: &str = "value";

/// A subcommand per verb.
pub fn commands() -> Vec<Command> {
    VERBS.iter().map(command).collect()
}

fn command(v: &Verb) -> Command {
    let mut c = Command::new(v.action).about(v.about).after_help(
        "The fault's target is --pod NAMESPACE/NAME (a global flag), --sandbox ID or --netns \
PATH; it lasts --for (default 5m). The created fault is printed; -o json for scripts.",
    );
    if let Some(p) = v.positional.and_then(|p| v.field(p)) {
        let arg = Arg::new(POSITIONAL)
            .value_name(p.flag.to_uppercase())
            .help(format!("{} (or --{})", p.help, p.flag));
        c = c.arg(match p.kind {
            FieldKind::List => arg.num_args(1..).action(ArgAction::Append),
            _ => arg,
        });
    }
    c = c.next_help_heading(format!("{} flags", v.action));
    for f in v.fields {
        let arg = Arg::new(f.flag).long(f.flag).help(f.help);
        c = c.arg(match f.kind {
            FieldKind::Switch => arg.action(ArgAction::SetTrue),
            FieldKind::List | FieldKind::Pairs => {
                arg.action(ArgAction::Append)
                    .value_name(if f.kind == FieldKind::Pairs {
                        "NAME=VALUE"
                    } else {
                        "VALUE"
                    })
            }
            _ => arg.value_name("VALUE"),
        });
    }
    c = c.next_help_heading("Fault flags (and the global --pod NAMESPACE/NAME)");
    for (_, flag, help) in COMMON_FLAGS {
        c = c.arg(Arg::new(*flag).long(*flag).help(*help).value_name("VALUE"));
    }
    c
}

/// Whether `name` is a verb.
pub fn is_verb(name: &str) -> bool {
    verb(name).is_some()
}

/// The fault JSON of verb `name` from its matches, `pod` being the global
/// `--pod`; validated as the API validates it. The error names the flag.
pub fn fault(name: &str, m: &ArgMatches, pod: Option<(&str, &str)>) -> Result<Value, String> {
    let v = verb(name).ok_or_else(|| format!("{name} is not a verb"))?;
    let mut given: Vec<(&str, Vec<String>)> = Vec::new();
    for f in v.fields {
        let values: Vec<String> = match f.kind {
            FieldKind::Switch => {
                if m.get_flag(f.flag) {
                    vec!["true".into()]
                } else {
                    Vec::new()
                }
            }
            _ => m
                .get_many::<String>(f.flag)
                .map(|vs| vs.cloned().collect())
                .unwrap_or_default(),
        };
        if !values.is_empty() {
            given.push((f.flag, values));
        }
    }
    if let Some(p) = v.positional {
        let values: Vec<String> = m
            .get_many::<String>(POSITIONAL)
            .map(|vs| vs.cloned().collect())
            .unwrap_or_default();
        if !values.is_empty() {
            if given.iter().any(|(f, _)| *f == p) {
                return Err(format!(
                    "--{p} is given twice: as the argument and as the flag"
                ));
            }
            given.push((p, values));
        }
    }
    let action = action_json(v, &given).map_err(|e| e.to_string())?;
    let common: Vec<(&str, String)> = COMMON_FLAGS
        .iter()
        .filter_map(|(_, flag, _)| m.get_one::<String>(flag).map(|s| (*flag, s.clone())))
        .collect();
    let fault = fault_json(action, &common, pod).map_err(|e| e.to_string())?;
    if fault.get("target").is_none() {
        return Err("no target: give --pod NAMESPACE/NAME, --sandbox ID or --netns PATH".into());
    }
    // The API's validation, with no policy (the agent applies its own).
    let limits = Limits {
        max_duration: std::time::Duration::MAX,
        target_required: true,
    };
    if let Err(e) = FaultSpec::parse(&fault, &limits) {
        let flag = flag_for_field(v, &e.field).unwrap_or_else(|| e.field.clone());
        return Err(format!("{flag}: {} (field {})", e.message, e.field));
    }
    Ok(fault)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(args: &[&str]) -> Result<Value, String> {
        let cmd = Command::new("netfaultctl").subcommands(commands());
        let m = cmd
            .try_get_matches_from(std::iter::once("netfaultctl").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let (name, sub) = m.subcommand().ok_or("no subcommand")?;
        fault(name, sub, None)
    }

    #[test]
    fn the_issues_examples_make_the_faults_they_say() {
        assert_eq!(
            parse(&[
                "delay",
                "100ms",
                "--jitter",
                "10ms",
                "--sandbox",
                "s1",
                "--for",
                "5m"
            ]),
            Ok(json!({"target": {"sandbox": "s1"}, "duration": "5m",
                "action": {"type": "delay", "latency": "100ms", "jitter": "10ms"}}))
        );
        assert_eq!(
            parse(&[
                "loss",
                "10%",
                "--to",
                "10.0.0.0/8",
                "--port",
                "80",
                "--netns",
                "/run/netns/x"
            ]),
            Ok(
                json!({"target": {"netns": "/run/netns/x"}, "duration": "5m",
                "match": {"cidr": "10.0.0.0/8", "ports": "80"},
                "action": {"type": "loss", "percent": "10%"}})
            )
        );
        assert_eq!(
            parse(&[
                "http-abort",
                "503",
                "--path",
                "/api/*",
                "--percent",
                "30",
                "--sandbox",
                "s",
                "--port",
                "8080"
            ]),
            Ok(
                json!({"target": {"sandbox": "s"}, "duration": "5m", "match": {"ports": "8080"},
                "action": {"type": "http-abort", "status": 503, "percent": "30",
                    "http": {"path": "/api/*"}}})
            )
        );
        assert_eq!(
            parse(&[
                "dns-error",
                "nxdomain",
                "--name",
                "*.example.com",
                "--sandbox",
                "s"
            ]),
            Ok(json!({"target": {"sandbox": "s"}, "duration": "5m",
                "action": {"type": "dns-error", "rcode": "nxdomain",
                    "dns": {"names": ["*.example.com"]}}}))
        );
        assert_eq!(
            parse(&[
                "dns-spoof",
                "192.0.2.1",
                "2001:db8::1",
                "--ttl",
                "30",
                "--sandbox",
                "s"
            ]),
            Ok(json!({"target": {"sandbox": "s"}, "duration": "5m",
                "action": {"type": "dns-spoof", "addresses": ["192.0.2.1", "2001:db8::1"], "ttl": 30}}))
        );
        assert_eq!(
            parse(&["http-abort", "--reset", "--sandbox", "s", "--port", "80"]),
            Ok(
                json!({"target": {"sandbox": "s"}, "duration": "5m", "match": {"ports": "80"},
                "action": {"type": "http-abort", "reset": true}})
            )
        );
    }

    #[test]
    fn errors_name_the_flag_and_the_field() {
        let e = parse(&["loss", "150%", "--sandbox", "s"]).expect_err("150%");
        assert!(
            e.starts_with("--percent: ") && e.ends_with("(field action.percent)"),
            "{e}"
        );
        let e = parse(&["delay", "100ms", "--sandbox", "s", "--for", "soon"]).expect_err("for");
        assert!(
            e.starts_with("--for: ") && e.contains("(field duration)"),
            "{e}"
        );
        let e =
            parse(&["delay", "100ms", "--sandbox", "s", "--to", "10.0.0.0/33"]).expect_err("to");
        assert!(
            e.starts_with("--to: ") && e.contains("(field match.cidr)"),
            "{e}"
        );
        let e = parse(&["http-abort", "700", "--sandbox", "s", "--port", "80"]).expect_err("700");
        assert!(
            e.starts_with("--status: ") && e.contains("(field action.status)"),
            "{e}"
        );
        let e = parse(&["delay", "100ms"]).expect_err("no target");
        assert!(e.contains("--pod") && e.contains("--sandbox"), "{e}");
        let e = parse(&["loss", "5", "--percent", "6", "--sandbox", "s"]).expect_err("twice");
        assert!(e.starts_with("--percent is given twice"), "{e}");
        let e = parse(&[
            "http-replace",
            "--header",
            "novalue",
            "--sandbox",
            "s",
            "--port",
            "1",
        ])
        .expect_err("pair");
        assert!(e.starts_with("--header: "), "{e}");
        let e = parse(&["dns-error", "--name", "", "--sandbox", "s"]);
        assert!(
            e.is_ok() || e.as_ref().is_err_and(|m| m.starts_with("--name")),
            "{e:?}"
        );
        let e = parse(&["loss", "5", "--sandbox", "s", "--bogus", "1"]).expect_err("bogus");
        assert!(e.contains("--bogus"), "{e}");
    }

    #[test]
    fn every_verb_has_a_subcommand_with_every_flag() {
        let cmds = commands();
        assert_eq!(cmds.len(), VERBS.len());
        for (c, v) in cmds.iter().zip(VERBS) {
            assert_eq!(c.get_name(), v.action);
            for f in v.fields {
                assert!(
                    c.get_arguments().any(|a| a.get_long() == Some(f.flag)),
                    "{} --{}",
                    v.action,
                    f.flag
                );
            }
            c.clone().debug_assert();
        }
    }
}
