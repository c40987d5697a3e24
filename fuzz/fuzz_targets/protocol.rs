//! Protocol messages as the exchange, sellers and buyers receive them from
//! one another: decoded, then checked the way the services check them.
#![no_main]

use cpushare_exchange::convert;
use cpushare_proto::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    match which % 9 {
        0 => {
            if let Ok(r) = pb::PlaceBuyRequest::decode(bytes) {
                let _ = convert::buy_from(r);
            }
        }
        1 => {
            if let Ok(r) = pb::PlaceSellRequest::decode(bytes) {
                let _ = convert::slot_from(r.slot);
                let _ = convert::kind_asks_from(&r.kind_asks);
            }
        }
        2 => {
            if let Ok(m) = pb::SellerMessage::decode(bytes) {
                if let Some(pb::seller_message::Body::Register(r)) = m.body {
                    for s in r.slots {
                        let _ = convert::slot_from(s.slot);
                        let _ = convert::kind_asks_from(&s.kind_asks);
                    }
                }
            }
        }
        3 => {
            if let Ok(f) = pb::RelayFrame::decode(bytes) {
                let _ = pb::JobMessage::decode(f.data.as_ref());
            }
        }
        4 => drop(pb::JobMessage::decode(bytes)),
        5 => drop(pb::NetworkView::decode(bytes)),
        6 => drop(pb::SessionMessage::decode(bytes)),
        7 => {
            if let Ok(e) = pb::OrderEntry::decode(bytes) {
                match e.order {
                    Some(pb::order_entry::Order::Buy(r)) => drop(convert::buy_from(r)),
                    Some(pb::order_entry::Order::Sell(r)) => {
                        let _ = convert::slot_from(r.slot);
                        let _ = convert::kind_asks_from(&r.kind_asks);
                    }
                    _ => {}
                }
            }
        }
        _ => drop(pb::JoinNetworkRequest::decode(bytes)),
    }
});
