//! The role matrix: what each role of an account may do. It lives here, once.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Owner,
    Admin,
    Member,
    Billing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Permission {
    ManageProjects,
    ManageUsers,
    ManageBilling,
    ManageSettings,
    ViewProjects,
    ViewUsers,
    ViewBilling,
    ViewSettings,
    ViewPreviewEnvironments,
}

impl Permission {
    pub const ALL: [Permission; 9] = [
        Permission::ManageProjects,
        Permission::ManageUsers,
        Permission::ManageBilling,
        Permission::ManageSettings,
        Permission::ViewProjects,
        Permission::ViewUsers,
        Permission::ViewBilling,
        Permission::ViewSettings,
        Permission::ViewPreviewEnvironments,
    ];
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Owner, Role::Admin, Role::Member, Role::Billing];

    pub fn allows(self, permission: Permission) -> bool {
        use Permission as P;
        match permission {
            P::ViewProjects | P::ViewUsers | P::ViewBilling | P::ViewSettings | P::ViewPreviewEnvironments => true,
            P::ManageProjects | P::ManageUsers | P::ManageSettings => matches!(self, Role::Owner | Role::Admin),
            P::ManageBilling => matches!(self, Role::Owner | Role::Billing),
        }
    }

    /// Whether a member with this role may give someone with role `from` the role `to` (`from`
    /// is `None` for someone new, `to` is `None` for removing them). Managing users is the
    /// matrix's; only an Owner makes or unmakes an Owner.
    pub fn may_assign(self, from: Option<Role>, to: Option<Role>) -> bool {
        self.allows(Permission::ManageUsers) && (self == Role::Owner || (from != Some(Role::Owner) && to != Some(Role::Owner)))
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str().eq_ignore_ascii_case(text))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "Owner",
            Role::Admin => "Admin",
            Role::Member => "Member",
            Role::Billing => "Billing",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_owners_make_or_unmake_owners() {
        use Role::*;
        assert!(Owner.may_assign(Some(Member), Some(Owner)));
        assert!(Owner.may_assign(Some(Owner), None));
        assert!(Admin.may_assign(Some(Member), Some(Admin)));
        assert!(Admin.may_assign(None, Some(Billing)));
        assert!(!Admin.may_assign(Some(Member), Some(Owner)));
        assert!(!Admin.may_assign(Some(Owner), Some(Member)));
        assert!(!Admin.may_assign(Some(Owner), None));
        assert!(!Member.may_assign(None, Some(Member)));
        assert!(!Billing.may_assign(Some(Member), None));
    }

    #[test]
    fn the_matrix_cell_by_cell() {
        // Rows in Permission::ALL order: ManageProjects, ManageUsers, ManageBilling, ManageSettings,
        // ViewProjects, ViewUsers, ViewBilling, ViewSettings, ViewPreviewEnvironments.
        let matrix: [(Role, [bool; 9]); 4] = [
            (Role::Owner, [true, true, true, true, true, true, true, true, true]),
            (Role::Admin, [true, true, false, true, true, true, true, true, true]),
            (Role::Member, [false, false, false, false, true, true, true, true, true]),
            (Role::Billing, [false, false, true, false, true, true, true, true, true]),
        ];
        for (role, row) in matrix {
            for (permission, allowed) in Permission::ALL.into_iter().zip(row) {
                assert_eq!(role.allows(permission), allowed, "{role:?} {permission:?}");
            }
        }
    }
}
