//! The exchange commands as a user types them.

mod common;

use common::*;

#[test]
fn a_member_enrolls_deposits_buys_and_reads_it_all_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (_exchange, operator) = exchange(tmp.path());
    let alice = tmp.path().join("alice");

    fails(&alice, &["balance"], "not enrolled");
    let created = json(&operator, &["account", "create", "alice"]);
    let token = created["token"].as_str().unwrap();
    let url = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(operator.join("node.json")).unwrap()).unwrap()["exchange"]
        .as_str()
        .unwrap()
        .to_string();
    let fp = json(&operator, &["exchange", "audit"]);
    assert_eq!(fp["ok"], true);
    let enrolled = json(&alice, &["enroll", "--exchange", &url, "--token", token]);
    assert_eq!(enrolled["account"], created["account"]);
    fails(&alice, &["enroll", "--exchange", &url, "--token", token], "already holds an enrolled node");

    let account = created["account"].as_u64().unwrap().to_string();
    fails(&alice, &["deposit", &account, "10"], "only the exchange operator");
    fails(&operator, &["deposit", &account, "ten"], "not an amount in euros");
    ok(&operator, &["deposit", &account, "25.50"]);
    let balance = json(&alice, &["balance"]);
    assert_eq!(balance["available (EUR)"], "25.50");
    // A dashboard sign-in token: 64 hex digits, a new one each time.
    let token = json(&alice, &["web-token"])["token"].as_str().unwrap().to_string();
    assert!(token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
    assert_ne!(json(&alice, &["web-token"])["token"].as_str().unwrap(), token);

    let placed = json(&alice, &["buy", "--cpus", "2", "--max-price", "40", "--min-ram", "2048"]);
    let order = placed["order"].as_u64().unwrap();
    assert_eq!(placed["still wanted"], 2);
    let orders = json(&alice, &["orders"]);
    assert_eq!(orders[0]["order"], order);
    assert_eq!(orders[0]["what"], "seccomp-strict, >= 2048 MiB");
    let table = ok(&alice, &["orders"]);
    assert!(table.starts_with("ORDER"), "{table}");
    let balance = json(&alice, &["balance"]);
    assert_eq!((balance["available (EUR)"].as_str(), balance["escrow (EUR)"].as_str()), (Some("24.70"), Some("0.80")));
    let book = json(&alice, &["book"]);
    assert_eq!(book[0]["side"], "bid");
    let statement = json(&alice, &["statement"]);
    assert!(statement.as_array().unwrap().len() >= 3);

    fails(&alice, &["buy", "--max-price", "0.5"], "invalid value '0.5'");
    fails(&alice, &["buy", "--max-price", "1", "--kind", "docker"], "unknown sandbox kind");
    fails(&alice, &["buy", "--max-price", "100000", "--cpus", "50"], "insufficient funds");
    fails(&alice, &["cancel", "99999"], "does not exist");
    ok(&alice, &["cancel", &order.to_string()]);
    assert_eq!(json(&alice, &["balance"])["escrow (EUR)"], "0.00");

    let halted = json(&operator, &["exchange", "halt"]);
    assert_eq!(halted["halted"], true);
    ok(&operator, &["exchange", "resume"]);

    let me = enrolled["node"].as_u64().unwrap().to_string();
    ok(&alice, &["node", "revoke", &me]);
    fails(&alice, &["balance"], "not trusted");
}
